{{/*
Expand the name of the chart.
*/}}
{{- define "wallet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters (DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "wallet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "wallet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "wallet.labels" -}}
helm.sh/chart: {{ include "wallet.chart" . }}
{{ include "wallet.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wallet
{{- end }}

{{/*
Selector labels: only name and instance, because a Deployment's selector never changes.
Each workload adds its app.kubernetes.io/component.
*/}}
{{- define "wallet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wallet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wallet.apiSelectorLabels" -}}
{{ include "wallet.selectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{- define "wallet.operatorSelectorLabels" -}}
{{ include "wallet.selectorLabels" . }}
app.kubernetes.io/component: migrator-operator
{{- end }}

{{/*
Names of the objects other objects refer to.
*/}}
{{- define "wallet.headlessName" -}}
{{- printf "%s-headless" (include "wallet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wallet.operatorName" -}}
{{- printf "%s-migrator" (include "wallet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wallet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wallet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wallet.databaseSecretName" -}}
{{- default (printf "%s-database" (include "wallet.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "wallet.redisSecretName" -}}
{{- default (printf "%s-redis" (include "wallet.fullname" .)) .Values.redis.existingSecret }}
{{- end }}

{{- define "wallet.internalSecretName" -}}
{{- default (printf "%s-internal" (include "wallet.fullname" .)) .Values.internalSecret.existingSecret }}
{{- end }}

{{/*
Image references: a digest wins over a tag; the tag defaults to the appVersion.
*/}}
{{- define "wallet.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "wallet.image" -}}
{{- include "wallet.imageRef" (dict "image" .Values.image "chart" .Chart) }}
{{- end }}

{{- define "wallet.migratorImage" -}}
{{- include "wallet.imageRef" (dict "image" .Values.migrator.image "chart" .Chart) }}
{{- end }}

{{/*
Internal ports are fixed: the node's defaults, named as in the container spec.
*/}}
{{- define "wallet.internalPort" -}}8090{{- end }}
{{- define "wallet.adminPort" -}}9090{{- end }}
{{- define "wallet.publicPort" -}}8080{{- end }}
