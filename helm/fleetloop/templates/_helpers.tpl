{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "fleetloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-fleetloop, or the release name alone when it already contains the chart name. */}}
{{- define "fleetloop.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<suffix>, at most 63 characters. Call with (list . "suffix"). */}}
{{- define "fleetloop.component.name" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "fleetloop.fullname" $root | trunc (int (sub 62 (len (index . 1))))) (index . 1) | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fleetloop.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels -------------------------------------------------------------------------------------
Chart objects are managed-by Helm; the objects the launcher creates per job are managed-by
fleetloop-controlplane, which is what the ServiceMonitor/PodMonitor select on. */}}

{{- define "fleetloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fleetloop.labels" -}}
helm.sh/chart: {{ include "fleetloop.chart" . }}
{{ include "fleetloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetloop
{{- end -}}

{{/* Labels of one component. Call with (list . "api"). */}}
{{- define "fleetloop.componentLabels" -}}
{{ include "fleetloop.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "fleetloop.componentSelector" -}}
{{ include "fleetloop.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Images: repository:tag, or repository:tag@digest. Call with an image values map. */}}
{{- define "fleetloop.image" -}}
{{- if .digest -}}
{{- printf "%s:%s@%s" .repository .tag .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* Capabilities -------------------------------------------------------------------------------
"true"/"false" strings, so templates compare with eq ... "true". */}}

{{/* KubeRay learners: learner.kuberay true/false, or auto = the cluster serves ray.io/v1. */}}
{{- define "fleetloop.kuberay" -}}
{{- if eq (toString .Values.learner.kuberay) "auto" -}}
{{- .Capabilities.APIVersions.Has "ray.io/v1" | toString -}}
{{- else -}}
{{- .Values.learner.kuberay | toString -}}
{{- end -}}
{{- end -}}

{{/* A Prometheus-operator object: enabled true/false, or auto = monitoring.coreos.com/v1 is served.
Call with (list . .Values.monitoring.serviceMonitor.enabled). */}}
{{- define "fleetloop.monitoringEnabled" -}}
{{- $root := index . 0 -}}
{{- if eq (toString (index . 1)) "auto" -}}
{{- $root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1" | toString -}}
{{- else -}}
{{- index . 1 | toString -}}
{{- end -}}
{{- end -}}

{{/* Security ----------------------------------------------------------------------------------- */}}

{{- define "fleetloop.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fleetloop.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Secrets and Redis ---------------------------------------------------------------------------- */}}

{{- define "fleetloop.apiKeys.secretName" -}}
{{- default (include "fleetloop.component.name" (list . "api-keys")) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "fleetloop.apiKeys.secretKey" -}}
{{- if .Values.apiKeys.existingSecret -}}{{ .Values.apiKeys.existingSecretKey }}{{- else -}}admin-key{{- end -}}
{{- end -}}

{{- define "fleetloop.redis.fullname" -}}
{{- include "fleetloop.component.name" (list . "redis") -}}
{{- end -}}

{{- define "fleetloop.redis.authEnabled" -}}
{{- and .Values.redis.bundled.enabled .Values.redis.bundled.auth.enabled | toString -}}
{{- end -}}

{{- define "fleetloop.redis.passwordSecretName" -}}
{{- default (include "fleetloop.redis.fullname" .) .Values.redis.bundled.auth.existingSecret -}}
{{- end -}}

{{- define "fleetloop.redis.passwordSecretKey" -}}
{{- if .Values.redis.bundled.auth.existingSecret -}}{{ .Values.redis.bundled.auth.existingSecretKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{- define "fleetloop.redis.urlSecretName" -}}
{{- if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- include "fleetloop.component.name" (list . "redis-url") -}}
{{- end -}}
{{- end -}}

{{- define "fleetloop.redis.urlSecretKey" -}}
{{- if .Values.redis.external.existingSecret -}}{{ .Values.redis.external.existingSecretKey }}{{- else -}}redis-url{{- end -}}
{{- end -}}

{{/* A base64 secret value that survives upgrades: the live Secret's value when the cluster has one
(lookup; empty when rendering offline), else a fresh random one. Call with (list . secretName key). */}}
{{- define "fleetloop.keptRandom" -}}
{{- $root := index . 0 -}}
{{- $live := lookup "v1" "Secret" $root.Release.Namespace (index . 1) -}}
{{- if and $live $live.data (hasKey $live.data (index . 2)) -}}
{{- index $live.data (index . 2) -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* The fail guard behind the schema's Redis rule, for values that bypass the schema. */}}
{{- define "fleetloop.redis.checkSource" -}}
{{- $n := 0 -}}
{{- if .Values.redis.bundled.enabled }}{{ $n = add1 $n }}{{ end -}}
{{- if .Values.redis.external.url }}{{ $n = add1 $n }}{{ end -}}
{{- if .Values.redis.external.existingSecret }}{{ $n = add1 $n }}{{ end -}}
{{- if ne (int $n) 1 -}}
{{- fail "redis: set exactly one source: redis.bundled.enabled=true, redis.external.url or redis.external.existingSecret" -}}
{{- end -}}
{{- end -}}

{{/* The API's Redis environment: REDIS_URL (the bundled URL embeds $(REDIS_PASSWORD), which
Kubernetes expands from the variable defined just before it). */}}
{{- define "fleetloop.redis.env" -}}
{{- if .Values.redis.bundled.enabled }}
{{- $host := printf "%s.%s.svc" (include "fleetloop.redis.fullname" .) .Release.Namespace }}
{{- if eq (include "fleetloop.redis.authEnabled" .) "true" }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "fleetloop.redis.passwordSecretName" . | quote }}
      key: {{ include "fleetloop.redis.passwordSecretKey" . | quote }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" $host | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ printf "redis://%s:6379/0" $host | quote }}
{{- end }}
{{- else }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "fleetloop.redis.urlSecretName" . | quote }}
      key: {{ include "fleetloop.redis.urlSecretKey" . | quote }}
{{- end }}
{{- end -}}

{{/* API ------------------------------------------------------------------------------------------ */}}

{{- define "fleetloop.api.scheme" -}}
{{- if .Values.api.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{- define "fleetloop.api.url" -}}
{{- printf "%s://%s.%s.svc:%d" (include "fleetloop.api.scheme" .) (include "fleetloop.component.name" (list . "api")) .Release.Namespace (int .Values.api.service.port) -}}
{{- end -}}

{{/* Job submission hook ------------------------------------------------------------------------- */}}

{{- define "fleetloop.submitEnv" -}}
- name: FLEETLOOP_API
  value: {{ include "fleetloop.api.url" . | quote }}
- name: FLEETLOOP_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "fleetloop.apiKeys.secretName" . | quote }}
      key: {{ include "fleetloop.apiKeys.secretKey" . | quote }}
- name: HOME
  value: /tmp
{{- if .Values.api.tls.enabled }}
- name: SSL_CERT_FILE
  value: {{ printf "/etc/fleetloop/api-tls/%s" .Values.api.tls.caKey | quote }}
{{- end }}
{{- end -}}

{{- define "fleetloop.submitMounts" -}}
- name: specs
  mountPath: /specs
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.api.tls.enabled }}
- name: api-tls
  mountPath: /etc/fleetloop/api-tls
  readOnly: true
{{- end }}
{{- end -}}
