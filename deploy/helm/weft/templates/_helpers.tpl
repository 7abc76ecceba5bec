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
The entries of one values list of proxies, `waypoints` or `gateways`: (dict "root" $ "field"
"waypoints"). Each entry merged over waypointDefaults (gatewayDefaults) with its defaults
filled in (serviceAccount = name), as a JSON list; fails on two entries with one name in one
namespace, on a name the chart already uses in its own namespace, on a PDB that would never
let a pod go, and on a grace period the drain does not fit in.
*/}}
{{- define "weft.proxies" -}}
{{- $root := .root -}}
{{- $kind := trimSuffix "s" .field -}}
{{- $defaults := index $root.Values (printf "%sDefaults" $kind) -}}
{{- $seen := dict -}}
{{- $out := list -}}
{{- range $i, $item := index $root.Values .field -}}
{{- $w := mergeOverwrite (deepCopy $defaults) (deepCopy $item) -}}
{{- $at := printf "%ss[%d]" $kind $i -}}
{{- $key := printf "%s/%s" $w.namespace $w.name -}}
{{- if hasKey $seen $key -}}
{{- fail (printf "%s: %s %s is given twice" $at $kind $key) -}}
{{- end -}}
{{- if and (eq $w.namespace $root.Release.Namespace) (has $w.name (list "weft-agent" "weft-agent-metrics" "weft-ca" "weft-node-cleanup")) -}}
{{- fail (printf "%s.name: %s is the name of one of the chart's own objects in %s" $at $w.name $w.namespace) -}}
{{- end -}}
{{- $pdb := $w.podDisruptionBudget -}}
{{- if and $pdb.enabled (gt (int $w.replicas) 1) (ge (int $pdb.minAvailable) (int $w.replicas)) -}}
{{- fail (printf "%s.podDisruptionBudget.minAvailable: %d of %d replicas would block every drain of their nodes; give fewer than replicas" $at (int $pdb.minAvailable) (int $w.replicas)) -}}
{{- end -}}
{{- $stopping := add (int $w.listenGraceSeconds) (int $w.drainLimitSeconds) -}}
{{- if le (int $w.terminationGracePeriodSeconds) (int $stopping) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be more than its listenGraceSeconds and drainLimitSeconds together (%d): the kubelet would kill the %s in the middle of its drain" $at (int $w.terminationGracePeriodSeconds) (int $stopping) $kind) -}}
{{- end -}}
{{- $_ := set $seen $key true -}}
{{- $_ := set $w "serviceAccount" ($w.serviceAccount | default $w.name) -}}
{{- $out = append $out $w -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* The waypoints of values.yaml (weft.proxies), as a JSON list. */}}
{{- define "weft.waypoints" -}}
{{- include "weft.proxies" (dict "root" . "field" "waypoints") -}}
{{- end -}}

{{/*
The gateways of values.yaml (weft.proxies), as a JSON list, with the checks of their own:
each listener name and port once, none on a port of the gateway itself (admin 15000, metrics
15020, readiness 15021), loadBalancerSourceRanges on a LoadBalancer only, no gateway where a
waypoint of that name is, nor one named as another's metrics Service (`<name>-metrics`), and
none running as a waypoint's service account (it would have
that waypoint's identity, which the services bound to the waypoint admit). Each entry gains
`unprivilegedPortStart`: its lowest listener port when that is under 1024, else 0.
*/}}
{{- define "weft.gateways" -}}
{{- $waypointNames := dict -}}
{{- $waypointAccounts := dict -}}
{{- range (include "weft.waypoints" . | fromJsonArray) -}}
{{- $_ := set $waypointNames (printf "%s/%s" .namespace .name) true -}}
{{- $_ := set $waypointAccounts (printf "%s/%s" .namespace .serviceAccount) true -}}
{{- end -}}
{{- $gateways := include "weft.proxies" (dict "root" . "field" "gateways") | fromJsonArray -}}
{{- $proxyNames := deepCopy $waypointNames -}}
{{- range $gateways -}}
{{- $_ := set $proxyNames (printf "%s/%s" .namespace .name) true -}}
{{- end -}}
{{- $out := list -}}
{{- range $i, $g := $gateways -}}
{{- $at := printf "gateways[%d]" $i -}}
{{- if and $.Values.serviceMonitor.enabled (hasKey $proxyNames (printf "%s/%s-metrics" $g.namespace $g.name)) -}}
{{- fail (printf "%s.name: %s/%s-metrics, the name of its metrics Service, is also a waypoint or a gateway" $at $g.namespace $g.name) -}}
{{- end -}}
{{- if hasKey $waypointNames (printf "%s/%s" $g.namespace $g.name) -}}
{{- fail (printf "%s.name: %s/%s is also a waypoint: the two would be one Deployment and one Service" $at $g.namespace $g.name) -}}
{{- end -}}
{{- if hasKey $waypointAccounts (printf "%s/%s" $g.namespace $g.serviceAccount) -}}
{{- fail (printf "%s.serviceAccount: %s/%s is a waypoint's: the gateway would have that waypoint's identity, which the services bound to the waypoint admit" $at $g.namespace $g.serviceAccount) -}}
{{- end -}}
{{- $names := dict -}}
{{- $ports := dict -}}
{{- $lowest := 65536 -}}
{{- range $j, $l := $g.listeners -}}
{{- $port := int $l.port -}}
{{- if hasKey $names $l.name -}}
{{- fail (printf "%s.listeners[%d].name: %s is given twice" $at $j $l.name) -}}
{{- end -}}
{{- if hasKey $ports (toString $port) -}}
{{- fail (printf "%s.listeners[%d].port: %d is given twice" $at $j $port) -}}
{{- end -}}
{{- if has $port (list 15000 15020 15021) -}}
{{- fail (printf "%s.listeners[%d].port: %d is the gateway's own (admin 15000, metrics 15020, readiness 15021)" $at $j $port) -}}
{{- end -}}
{{- $_ := set $names $l.name true -}}
{{- $_ := set $ports (toString $port) true -}}
{{- $lowest = min $lowest $port -}}
{{- end -}}
{{- if and $g.service.loadBalancerSourceRanges (ne $g.service.type "LoadBalancer") -}}
{{- fail (printf "%s.service.loadBalancerSourceRanges: only a LoadBalancer Service has them, not a %s" $at $g.service.type) -}}
{{- end -}}
{{- $_ := set $g "unprivilegedPortStart" (ternary $lowest 0 (lt (int $lowest) 1024)) -}}
{{- $out = append $out $g -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/*
The namespaces of the waypoints and gateways other than the release namespace, sorted, each
once: where the CA also publishes the trust bundle (and may write that one ConfigMap).
*/}}
{{- define "weft.proxyNamespaces" -}}
{{- $namespaces := list -}}
{{- range concat (include "weft.waypoints" . | fromJsonArray) (include "weft.gateways" . | fromJsonArray) -}}
{{- if ne .namespace $.Release.Namespace -}}
{{- $namespaces = append $namespaces .namespace -}}
{{- end -}}
{{- end -}}
{{- $namespaces | uniq | sortAlpha | toJson -}}
{{- end -}}
