{{- define "outrider.labels" -}}
app.kubernetes.io/name: outrider-webhook
app.kubernetes.io/part-of: outrider
{{- end -}}

{{- define "outrider.certManager" -}}
{{- if eq .Values.certificates.mode "cert-manager" -}}true{{- else if eq .Values.certificates.mode "self-managed" -}}{{- else -}}
{{- fail (printf "certificates.mode %q: allowed values are self-managed and cert-manager" .Values.certificates.mode) -}}
{{- end -}}
{{- end -}}

{{- define "outrider.namespaceExclusion" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values: {{ toJson (concat .Values.webhook.excludeNamespaces (list .Release.Namespace)) }}
{{- with .Values.webhook.extraNamespaceSelectorExpressions }}
{{ toYaml . }}
{{- end }}
{{- end -}}
