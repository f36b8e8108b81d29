"""Packet and drop traces: capture, pcapng, filters, stored captures and their HTTP API."""
