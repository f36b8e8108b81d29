"""Who a pod talks to: peer addresses and the identities they resolve to."""
