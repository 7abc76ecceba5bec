{{/*
Names and labels shared by every template. Object names are fixed (weft-agent, weft-ca, …)
rather than derived from the release name: there is one mesh per cluster, and agents, the CA
and the docs refer to these names.
*/}}

{{- define "weft.labels" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "component" "agent" "root" $). */}}
{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects. */}}
{{- define "weft.componentLabels" -}}
{{ include "weft.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "weft.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end -}}

{{/* The CA's DNS name inside the cluster: what agents dial and verify. */}}
{{- define "weft.caHost" -}}
{{ printf "weft-ca.%s.svc" .Release.Namespace }}
{{- end -}}

{{/*
Plural names of the weft.dev CRDs shipped in crds/ (one CRD per file, written by
`cargo xtask gen`), as a comma-separated list: the agent may read exactly these.
*/}}
{{- define "weft.crdPlurals" -}}
{{- $plurals := list -}}
{{- range $path, $_ := .Files.Glob "crds/*.yaml" -}}
{{- $crd := $.Files.Get $path | fromYaml -}}
{{- if eq (dig "spec" "group" "" $crd) "weft.dev" -}}
{{- $plurals = append $plurals (dig "spec" "names" "plural" "" $crd) -}}
{{- end -}}
{{- end -}}
{{- $plurals | sortAlpha | join "," -}}
{{- end -}}

{{/* Pod security context shared by the weft pods that need no host access. */}}
{{- define "weft.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
