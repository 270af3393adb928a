{{- define "ces.labels" -}}
app.kubernetes.io/part-of: ces
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "ces.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
