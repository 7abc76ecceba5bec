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

{{- /*
How a weft pod reaches the CA, shared by the agent and the waypoints so that both dial,
verify and authenticate the same way: the CA's address, and where the trust bundle and the
projected CA token are mounted.
*/}}
{{- define "weft.caAddr" -}}
{{ printf "%s:%d" (include "weft.caHost" .) (int .Values.ca.port) }}
{{- end -}}

{{- define "weft.caRootCertPath" -}}
{{ printf "/etc/weft/ca/%s" .Values.ca.trustBundleKey }}
{{- end -}}

{{- define "weft.caTokenPath" -}}
/var/run/secrets/weft/token
{{- end -}}

{{/* volumeMounts of the trust bundle and the CA token (paths above). */}}
{{- define "weft.caVolumeMounts" -}}
- name: trust-bundle
  mountPath: /etc/weft/ca
  readOnly: true
- name: ca-token
  mountPath: {{ include "weft.caTokenPath" . | dir }}
  readOnly: true
{{- end -}}

{{/*
The volumes behind weft.caVolumeMounts. The trust bundle is the ConfigMap the CA publishes
(in the release namespace, and in every waypoint namespace: a pod mounts ConfigMaps of its
own namespace only). Not optional: without it nobody can be verified, and the pod waits
(ContainerCreating) until the CA has published it.
The token is presented to the CA: bound to this pod (and so to its node), for the CA's
audience only, rotated by the kubelet; weft re-reads it on every request.
*/}}
{{- define "weft.caVolumes" -}}
- name: trust-bundle
  configMap:
    name: {{ .Values.ca.trustBundleConfigMap }}
- name: ca-token
  projected:
    sources:
      - serviceAccountToken:
          path: {{ include "weft.caTokenPath" . | base }}
          audience: {{ .Values.ca.tokenAudience | quote }}
          expirationSeconds: {{ int .Values.ca.tokenExpirationSeconds }}
{{- end -}}

{{/* WEFT_LOG and WEFT_LOG_FORMAT: (dict "root" $ "format" <format or "">). */}}
{{- define "weft.logEnv" -}}
- name: WEFT_LOG
  value: {{ .root.Values.logLevel | quote }}
- name: WEFT_LOG_FORMAT
  value: {{ .format | default .root.Values.logFormat | quote }}
{{- end -}}

{{/*
The waypoints of values.yaml, each merged over waypointDefaults with its defaults filled
in (serviceAccount = name), as a JSON list; fails on two waypoints with one name in one
namespace, on a name the chart already uses in its own namespace, and on a PDB that would
never let a pod go.
*/}}
{{- define "weft.waypoints" -}}
{{- $seen := dict -}}
{{- $out := list -}}
{{- range $i, $item := .Values.waypoints -}}
{{- $w := mergeOverwrite (deepCopy $.Values.waypointDefaults) (deepCopy $item) -}}
{{- $key := printf "%s/%s" $w.namespace $w.name -}}
{{- if hasKey $seen $key -}}
{{- fail (printf "waypoints[%d]: waypoint %s is given twice" $i $key) -}}
{{- end -}}
{{- if and (eq $w.namespace $.Release.Namespace) (has $w.name (list "weft-agent" "weft-agent-metrics" "weft-ca" "weft-node-cleanup")) -}}
{{- fail (printf "waypoints[%d].name: %s is the name of one of the chart's own objects in %s" $i $w.name $w.namespace) -}}
{{- end -}}
{{- $pdb := $w.podDisruptionBudget -}}
{{- if and $pdb.enabled (gt (int $w.replicas) 1) (ge (int $pdb.minAvailable) (int $w.replicas)) -}}
{{- fail (printf "waypoints[%d].podDisruptionBudget.minAvailable: %d of %d replicas would block every drain of their nodes; give fewer than replicas" $i (int $pdb.minAvailable) (int $w.replicas)) -}}
{{- end -}}
{{- $stopping := add (int $w.listenGraceSeconds) (int $w.drainLimitSeconds) -}}
{{- if le (int $w.terminationGracePeriodSeconds) (int $stopping) -}}
{{- fail (printf "waypoints[%d].terminationGracePeriodSeconds (%d) must be more than its listenGraceSeconds and drainLimitSeconds together (%d): the kubelet would kill the waypoint in the middle of its drain" $i (int $w.terminationGracePeriodSeconds) (int $stopping)) -}}
{{- end -}}
{{- $_ := set $seen $key true -}}
{{- $_ := set $w "serviceAccount" ($w.serviceAccount | default $w.name) -}}
{{- $out = append $out $w -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/*
The namespaces of the waypoints other than the release namespace, sorted, each once: where
the CA also publishes the trust bundle (and may write that one ConfigMap).
*/}}
{{- define "weft.waypointNamespaces" -}}
{{- $namespaces := list -}}
{{- range (include "weft.waypoints" . | fromJsonArray) -}}
{{- if ne .namespace $.Release.Namespace -}}
{{- $namespaces = append $namespaces .namespace -}}
{{- end -}}
{{- end -}}
{{- $namespaces | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/* Selector labels of one waypoint's pods: (dict "name" <waypoint name> "root" $). */}}
{{- define "weft.waypointSelectorLabels" -}}
{{ include "weft.selectorLabels" (dict "component" "waypoint" "root" .root) }}
weft.dev/waypoint: {{ .name }}
{{- end -}}
