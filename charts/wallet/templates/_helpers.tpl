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
<fullname>-<suffix> within 63 characters: the fullname is shortened, never the suffix,
so a fullname at the maximum length still gives names distinct from the fullname itself.
Call with (dict "root" $ "suffix" "migrator").
*/}}
{{- define "wallet.suffixedName" -}}
{{- $suffix := printf "-%s" .suffix }}
{{- $room := int (sub 63 (len $suffix)) }}
{{- printf "%s%s" (include "wallet.fullname" .root | trunc $room | trimSuffix "-") $suffix }}
{{- end }}

{{/*
Names of the objects other objects refer to.
*/}}
{{- define "wallet.headlessName" -}}
{{- include "wallet.suffixedName" (dict "root" . "suffix" "headless") }}
{{- end }}

{{- define "wallet.operatorName" -}}
{{- include "wallet.suffixedName" (dict "root" . "suffix" "migrator") }}
{{- end }}

{{- define "wallet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wallet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wallet.databaseSecretName" -}}
{{- default (include "wallet.suffixedName" (dict "root" . "suffix" "database")) .Values.database.existingSecret }}
{{- end }}

{{/* The migration's Secret and key: the owner's when given, else the nodes'. */}}
{{- define "wallet.databaseOwnerSecretName" -}}
{{- $owner := .Values.database.owner }}
{{- if $owner.existingSecret }}{{ $owner.existingSecret }}
{{- else if $owner.url }}{{ include "wallet.suffixedName" (dict "root" . "suffix" "database-owner") }}
{{- else }}{{ include "wallet.databaseSecretName" . }}
{{- end }}
{{- end }}

{{- define "wallet.databaseOwnerSecretKey" -}}
{{- $owner := .Values.database.owner }}
{{- if or $owner.existingSecret $owner.url }}{{ $owner.secretKey }}{{ else }}{{ .Values.database.secretKey }}{{ end }}
{{- end }}

{{- define "wallet.redisSecretName" -}}
{{- default (include "wallet.suffixedName" (dict "root" . "suffix" "redis")) .Values.redis.existingSecret }}
{{- end }}

{{- define "wallet.internalSecretName" -}}
{{- default (include "wallet.suffixedName" (dict "root" . "suffix" "internal")) .Values.internalSecret.existingSecret }}
{{- end }}

{{/*
Redis key prefix: two releases sharing a Redis (or a namespace) must not share membership,
leases or fencing counters, so the default is unique per release.
*/}}
{{- define "wallet.redisPrefix" -}}
{{- if .Values.node.redisPrefix }}
{{- .Values.node.redisPrefix }}
{{- else }}
{{- /* A running release keeps the prefix its pods use: old and new pods of a rolling upgrade must meet in the same membership. */}}
{{- $live := "" }}
{{- $deployment := lookup "apps/v1" "Deployment" .Release.Namespace (include "wallet.fullname" .) }}
{{- range (dig "spec" "template" "spec" "containers" (list) $deployment) }}
{{- range (dig "env" (list) .) }}
{{- if eq .name "WALLET_REDIS_PREFIX" }}{{ $live = .value }}{{ end }}
{{- end }}
{{- end }}
{{- default (printf "%s-%s" .Release.Namespace (include "wallet.fullname" .)) $live }}
{{- end }}
{{- end }}

{{/*
The replica count of the running Deployment, or "" on install and under `helm template`.
*/}}
{{- define "wallet.liveReplicas" -}}
{{- $deployment := lookup "apps/v1" "Deployment" .Release.Namespace (include "wallet.fullname" .) }}
{{- with (dig "spec" "replicas" "" $deployment) }}{{ . }}{{ end }}
{{- end }}

{{/*
Changes of the Secrets the chart renders from values (or of which Secrets the pods read)
roll the pods; env from a Secret is read only at container start.
*/}}
{{- define "wallet.secretsChecksum" -}}
{{- dict "database" .Values.database "redis" .Values.redis "internal" .Values.internalSecret | toJson | sha256sum }}
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

{{/*
The API container's authentication settings. With mode jwt exactly one key source.
*/}}
{{- define "wallet.authEnv" -}}
{{- $auth := .Values.auth -}}
{{- if eq $auth.mode "off" -}}
- name: WALLET_AUTH
  value: "off"
- name: WALLET_AUTH_OFF_TENANT
  value: {{ $auth.offTenant | quote }}
{{- else -}}
{{- $sources := 0 -}}
{{- if $auth.oidcIssuerUrl }}{{ $sources = add1 $sources }}{{ end -}}
{{- if $auth.jwksUrl }}{{ $sources = add1 $sources }}{{ end -}}
{{- if $auth.jwksConfigMap }}{{ $sources = add1 $sources }}{{ end -}}
{{- if ne (int $sources) 1 -}}
{{- fail "auth: set exactly one of auth.oidcIssuerUrl, auth.jwksUrl and auth.jwksConfigMap (the issuer of your tokens), or auth.mode=off for a benchmark" -}}
{{- end -}}
{{- if and (not $auth.oidcIssuerUrl) (not $auth.issuer) -}}
{{- fail "auth.issuer: the accepted iss value(s) of your tokens are required with auth.jwksUrl or auth.jwksConfigMap" -}}
{{- end -}}
{{- with $auth.oidcIssuerUrl }}
- name: WALLET_AUTH_OIDC_ISSUER_URL
  value: {{ . | quote }}
{{- end }}
{{- with $auth.jwksUrl }}
- name: WALLET_AUTH_JWKS_URL
  value: {{ . | quote }}
{{- end }}
{{- if $auth.jwksConfigMap }}
- name: WALLET_AUTH_JWKS_FILE
  value: /etc/wallet/jwks/{{ $auth.jwksConfigMapKey }}
{{- end }}
{{- with $auth.issuer }}
- name: WALLET_AUTH_ISSUER
  value: {{ . | quote }}
{{- end }}
- name: WALLET_AUTH_AUDIENCE
  value: {{ $auth.audience | quote }}
- name: WALLET_AUTH_TENANT_CLAIM
  value: {{ $auth.tenantClaim | quote }}
- name: WALLET_AUTH_LEEWAY_SECONDS
  value: {{ $auth.leewaySeconds | quote }}
{{- end }}
{{- with $auth.rateLimits }}
- name: WALLET_RATE_LIMIT_READ
  value: {{ .read | quote }}
- name: WALLET_RATE_LIMIT_WRITE
  value: {{ .write | quote }}
- name: WALLET_RATE_LIMIT_CREATE
  value: {{ .create | quote }}
{{- end }}
{{- end }}

{{/*
"true" when a CA bundle is given (caBundle.secretName or caBundle.configMapName, never both).
*/}}
{{- define "wallet.caBundleEnabled" -}}
{{- $ca := .Values.caBundle -}}
{{- if and $ca.secretName $ca.configMapName -}}
{{- fail "caBundle: set caBundle.secretName or caBundle.configMapName, not both" -}}
{{- end -}}
{{- if and $ca.redis (not (or $ca.secretName $ca.configMapName)) -}}
{{- fail "caBundle.redis needs the bundle: set caBundle.secretName or caBundle.configMapName" -}}
{{- end -}}
{{- if or $ca.secretName $ca.configMapName }}true{{ end -}}
{{- end }}

{{/*
PostgreSQL's CA for sqlx (the node and the migrator read PGSSLROOTCERT and PGSSLMODE).
*/}}
{{- define "wallet.caBundleEnv" -}}
- name: PGSSLROOTCERT
  value: /etc/wallet/ca/{{ .Values.caBundle.key }}
- name: PGSSLMODE
  value: {{ .Values.caBundle.sslMode | quote }}
{{- end }}

{{- define "wallet.caBundleMount" -}}
- name: ca-bundle
  mountPath: /etc/wallet/ca
  readOnly: true
{{- end }}

{{- define "wallet.caBundleVolume" -}}
{{- $ca := .Values.caBundle -}}
- name: ca-bundle
  {{- if $ca.secretName }}
  secret:
    secretName: {{ $ca.secretName }}
  {{- else }}
  configMap:
    name: {{ $ca.configMapName }}
  {{- end }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
{{- end }}

{{/*
The WalletMigration's caBundle: the operator mounts the same bundle into the Job.
*/}}
{{- define "wallet.caBundleSpec" -}}
{{- $ca := .Values.caBundle -}}
caBundle:
  {{- if $ca.secretName }}
  secretName: {{ $ca.secretName }}
  {{- else }}
  configMapName: {{ $ca.configMapName }}
  {{- end }}
  key: {{ $ca.key }}
  sslMode: {{ $ca.sslMode }}
{{- end }}
