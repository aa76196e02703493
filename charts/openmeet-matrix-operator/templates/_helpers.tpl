{{/* Chart name, truncated to a DNS label. */}}
{{- define "omo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the
chart name. Leaves room for the longest suffixes ("-appservice", "-controller").
*/}}
{{- define "omo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of cluster-scoped objects: unique per release and namespace. */}}
{{- define "omo.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "omo.fullname" .) }}
{{- end }}

{{- define "omo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "omo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "omo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Pods of the controller Deployment. */}}
{{- define "omo.controllerSelectorLabels" -}}
{{ include "omo.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{/* Pods of the sidecar Deployment. */}}
{{- define "omo.sidecarSelectorLabels" -}}
{{ include "omo.selectorLabels" . }}
app.kubernetes.io/component: sidecar
{{- end }}

{{- define "omo.labels" -}}
helm.sh/chart: {{ include "omo.chart" . }}
{{ include "omo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: openmeet
{{- end }}

{{- define "omo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "omo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The sidecar's own ServiceAccount: it faces the internet, so it holds
only what it uses, and nothing of the controller's. */}}
{{- define "omo.sidecarServiceAccountName" -}}
{{- $sa := .Values.sidecar.serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-sidecar" (include "omo.fullname" .)) $sa.name }}
{{- else }}
{{- required "sidecar.serviceAccount.name is required when sidecar.serviceAccount.create is false" $sa.name }}
{{- end }}
{{- end }}

{{/* The ServiceAccount the chart makes for the platform's writer
(rbac.platformWriter.serviceAccount.create). */}}
{{- define "omo.platformServiceAccountName" -}}
{{- default (printf "%s-platform" (include "omo.fullname" .)) .Values.rbac.platformWriter.serviceAccount.name }}
{{- end }}

{{/*
The namespace of the sidecar's code-redemption records (one Lease per
redeemed authorization code, names not known in advance). It is their own:
the sidecar may read, patch and delete every Lease there, so it must not be
the release namespace, where the controller's leader Lease lives.
*/}}
{{- define "omo.stateNamespace" -}}
{{- $ns := default (printf "%s-oidc-codes" (include "omo.clusterName" .) | trunc 63 | trimSuffix "-") .Values.sidecar.stateNamespace.name }}
{{- if or (eq $ns .Release.Namespace) (eq $ns (default "" .Values.watchNamespace)) }}
{{- fail "sidecar.stateNamespace.name must be a namespace of its own: not the release namespace (the controller's leader Lease) nor watchNamespace" }}
{{- end }}
{{- $ns }}
{{- end }}

{{- define "omo.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* `<release namespace>/<appservice Secret>`: what AS_TOKEN_SECRET names. */}}
{{- define "omo.asTokenSecret" -}}
{{- printf "%s/%s" .Release.Namespace .Values.appservice.existingSecret }}
{{- end }}

{{- define "omo.leaseName" -}}
{{- default (include "omo.fullname" .) .Values.controller.leaderElection.leaseName }}
{{- end }}

{{/* The platform's HS256 secret is mounted only without a JWKS URL. */}}
{{- define "omo.platformSecretMounted" -}}
{{- if not .Values.sidecar.platform.jwksUrl }}true{{ end }}
{{- end }}

{{/* The pod security context both Deployments share. */}}
{{- define "omo.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The hardened container security context both containers share. */}}
{{- define "omo.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* RBAC rules over the watched kinds (ClusterRole, or Role with watchNamespace). */}}
{{- define "omo.watchRules" }}
  - apiGroups: ["matrix.openmeet.net"]
    resources: ["matrixusers", "matrixrooms", "roompermissions"]
    verbs: ["get", "list", "watch", "patch"]
  - apiGroups: ["matrix.openmeet.net"]
    resources: ["matrixusers/status", "matrixrooms/status", "roompermissions/status"]
    verbs: ["get", "patch"]
  - apiGroups: ["matrix.openmeet.net"]
    resources: ["matrixusergrants"]
    verbs: ["get", "list", "watch"]
  - apiGroups: ["matrix.openmeet.net"]
    resources: ["matrixusergrants/status"]
    verbs: ["get", "patch"]
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
{{- end }}
{{- define "omo.namespaceRules" }}
  - apiGroups: [""]
    resources: ["namespaces"]
    verbs: ["list", "watch"]
{{- end }}
{{/* The sidecar's view of MatrixUsers: read only. */}}
{{- define "omo.sidecarUserRules" }}
  - apiGroups: ["matrix.openmeet.net"]
    resources: ["matrixusers"]
    verbs: ["get", "list", "watch"]
{{- end }}
