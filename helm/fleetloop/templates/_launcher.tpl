{{/* The in-cluster launcher's settings, as the API pod's FLEETLOOP_K8S_<FIELD> environment.

Each name is a field of services.control.launchers.k8s_settings.KubeSettings (an unknown FLEETLOOP_K8S_* name stops
the API at start). Lists and maps are JSON, booleans "true"/"false". The namespace is not here: the
API takes it from FLEETLOOP_NAMESPACE (downward API). Optional settings are left out when unset so
the launcher's defaults apply: STATE_STORAGE_CLASS (unset = emptyDir), TLS_SECRET and, with it,
TLS_CLIENT_AUTH, ROBOT_TLS_SECRET. */}}
{{- define "fleetloop.launcherSettings" -}}
{{- $l := .Values.learner -}}
{{- $s := dict
  "LEARNER_IMAGE" (include "fleetloop.image" $l.image)
  "ROBOT_IMAGE" (include "fleetloop.image" .Values.robots.image)
  "IMAGE_PULL_POLICY" .Values.imagePullPolicy
  "IMAGE_PULL_SECRETS" (.Values.imagePullSecrets | toJson)
  "REDIS_URL" (default "$(REDIS_URL)" $l.redisUrl)
  "LEARNER_SERVICE_TYPE" $l.service.type
  "LEARNER_SERVICE_ANNOTATIONS" ($l.service.annotations | toJson)
  "KUBERAY" (include "fleetloop.kuberay" .)
  "RAY_WORKERS" ($l.ray.workers | toString)
  "RAY_WORKER_GPUS" ($l.ray.gpusPerWorker | toString)
  "STATE_SIZE" $l.state.size
  "NODE_SELECTOR" ($l.nodeSelector | toJson)
  "TOLERATIONS" ($l.tolerations | toJson)
  "LEARNER_MEMORY" $l.memory
  "ROBOT_CPU" (.Values.robots.cpu | toString)
  "ROBOT_MEMORY" .Values.robots.memory
-}}
{{- if $l.state.storageClass -}}
{{- $_ := set $s "STATE_STORAGE_CLASS" $l.state.storageClass -}}
{{- end -}}
{{- if $l.tls.secretName -}}
{{- $_ := set $s "TLS_SECRET" $l.tls.secretName -}}
{{- $_ := set $s "TLS_CLIENT_AUTH" ($l.tls.clientAuth | toString) -}}
{{- end -}}
{{- if .Values.robots.tlsSecret -}}
{{- $_ := set $s "ROBOT_TLS_SECRET" .Values.robots.tlsSecret -}}
{{- end -}}
{{- toJson $s -}}
{{- end -}}

{{- define "fleetloop.launcherEnv" -}}
{{- range $field, $value := include "fleetloop.launcherSettings" . | fromJson }}
- name: FLEETLOOP_K8S_{{ $field }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}
