{{/*
The HPA metric served by prometheus-adapter (see prometheus-adapter-values.yaml), derived
from wallet_http_requests_total. scripts/k8s-check.sh checks both files name the same metric.
*/}}
{{- define "wallet.hpaMetricName" -}}wallet_http_requests_per_second{{- end }}

{{/*
Scaling behaviour shared by the HPA and KEDA's HPA: every scale event moves shards, so a
scale-down waits for a long stabilization window and removes one pod per period.
*/}}
{{- define "wallet.hpaBehavior" -}}
scaleDown:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleDown.stabilizationWindowSeconds }}
  selectPolicy: Min
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.scaleDown.podsPerPeriod }}
      periodSeconds: {{ .Values.autoscaling.scaleDown.periodSeconds }}
scaleUp:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleUp.stabilizationWindowSeconds }}
  selectPolicy: Max
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.scaleUp.podsPerPeriod }}
      periodSeconds: {{ .Values.autoscaling.scaleUp.periodSeconds }}
{{- end }}
