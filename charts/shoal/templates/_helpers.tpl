{{/*
Names and labels shared by every template. The CSI driver name and the binaries' paths are fixed by
the code (shoal_csi, Dockerfiles); e2e/tests/chart.rs checks them against the crates.
*/}}

{{- define "shoal.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shoal.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The CSI driver name: shoal_csi::DRIVER_NAME. */}}
{{- define "shoal.csiDriverName" -}}csi.shoal.dev{{- end -}}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "operator"). */}}
{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference; call with (dict "root" $ "image" .Values.x.image). Empty tag = appVersion. */}}
{{- define "shoal.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "shoal.operatorServiceAccount" -}}{{ include "shoal.fullname" . }}-operator{{- end -}}
{{- define "shoal.csiControllerServiceAccount" -}}{{ include "shoal.fullname" . }}-csi-controller{{- end -}}
{{- define "shoal.csiNodeServiceAccount" -}}{{ include "shoal.fullname" . }}-csi-node{{- end -}}

{{/* Security context of containers that need nothing from the host (the upstream CSI sidecar
images run as root, so non-root is set per pod where the image allows it). */}}
{{- define "shoal.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
