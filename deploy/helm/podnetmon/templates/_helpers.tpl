{{/* Labels every object carries; the selector's two come first. */}}
{{- define "podnetmon.selectorLabels" -}}
app.kubernetes.io/name: podnetmon
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "podnetmon.labels" -}}
{{ include "podnetmon.selectorLabels" . }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/part-of: podnetmon
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "podnetmon.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}
