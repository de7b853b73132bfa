{{- define "runcast.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "runcast.labels" -}}
app.kubernetes.io/name: runcast
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The prefix of every object's name: the release name, or
     fullnameOverride, or the release name and nameOverride. Labels and
     selectors keep app.kubernetes.io/name=runcast: the operator labels the
     gateway pods with it. */}}
{{- /* The prefix of every object the chart makes. Refused here, before
anything is installed, unless it is a DNS label that starts with a letter
and leaves room for the longest suffix ("-operator-metrics", 17): a Service
name must be both, and a failed install would leave its first objects
behind. Not truncated: two releases truncated to one name would collide. */ -}}
{{- define "runcast.fullname" -}}
{{- $name := .Release.Name -}}
{{- $from := "the release name" -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride -}}
{{- $from = "fullnameOverride" -}}
{{- else if .Values.nameOverride -}}
{{- $name = printf "%s-%s" .Release.Name .Values.nameOverride -}}
{{- $from = "the release name and nameOverride" -}}
{{- end -}}
{{- if or (gt (len $name) 46) (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name)) -}}
{{- fail (printf "%s gives the object name prefix %q: it must be at most 46 characters of lower-case letters, digits and '-', starting with a letter (Service names are DNS labels of at most 63, and the longest suffix is -operator-metrics); set fullnameOverride" $from $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "runcast.operatorName" -}}
{{ include "runcast.fullname" . }}-operator
{{- end -}}

{{- define "runcast.operatorServiceAccount" -}}
{{ .Values.operator.serviceAccount.name | default (include "runcast.operatorName" .) }}
{{- end -}}

{{- define "runcast.natsName" -}}
{{ include "runcast.fullname" . }}-nats
{{- end -}}

{{/* Where the gateways and workers find NATS. Short names (same
     namespace), so rendered manifests work in any namespace. */}}
{{- define "runcast.natsUrl" -}}
{{- if .Values.nats.bundled -}}
{{- $name := include "runcast.natsName" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.nats.replicas) -}}
{{- $urls = append $urls (printf "nats://%s-%d.%s-headless:4222" $name $i $name) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- required "nats.url is required when nats.bundled is false" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{- define "runcast.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "runcast.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
