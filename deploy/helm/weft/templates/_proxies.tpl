{{- /*
What the chart's two kinds of per-entry proxies share: waypoints (waypoint.yaml, values
waypoints[]) and gateways (gateway.yaml, values gateways[]). Both are `weft <kind> --source
kubernetes` in a Deployment of their own namespace, never enrolled, with no capability and no
host access, reaching the CA as the agents do. The templates below take
(dict "root" $ "component" "waypoint"|"gateway" ...) and an entry of weft.waypoints or
weft.gateways as "proxy" (or the list of them as "proxies").
*/}}

{{/* Selector labels of one proxy's pods: (dict "component" … "name" <entry name> "root" $). */}}
{{- define "weft.proxySelectorLabels" -}}
{{ include "weft.selectorLabels" . }}
weft.dev/{{ .component }}: {{ .name }}
{{- end -}}

{{/* All labels of one proxy's objects, same argument. */}}
{{- define "weft.proxyLabels" -}}
{{ include "weft.componentLabels" . }}
weft.dev/{{ .component }}: {{ .name }}
{{- end -}}

{{/* The service accounts of "proxies", each once (entries may share one). */}}
{{- define "weft.proxyServiceAccounts" -}}
{{- $accounts := dict -}}
{{- range .proxies -}}
{{- $account := printf "%s/%s" .namespace .serviceAccount -}}
{{- if not (hasKey $accounts $account) -}}
{{- $_ := set $accounts $account true }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .serviceAccount }}
  namespace: {{ .namespace }}
  labels:
    {{- include "weft.componentLabels" (dict "component" $.component "root" $.root) | nindent 4 }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The subjects of a binding to the accounts of a list of proxies, each once. */}}
{{- define "weft.proxySubjects" -}}
{{- $subjects := list -}}
{{- $seen := dict -}}
{{- range . -}}
{{- $account := printf "%s/%s" .namespace .serviceAccount -}}
{{- if not (hasKey $seen $account) -}}
{{- $_ := set $seen $account true -}}
{{- $subjects = append $subjects (dict "kind" "ServiceAccount" "name" .serviceAccount "namespace" .namespace) -}}
{{- end -}}
{{- end -}}
{{- toYaml $subjects -}}
{{- end -}}

{{- /*
The rules of what a proxy reads, cluster-wide (the argument is $): its snapshot is the mesh's
workloads, services and policies (backends and clients live in any namespace), and the Gateway
API routes (a waypoint's: those whose parents are its services, GAMMA; a gateway's: those
whose parent is its Gateway, from any namespace its listeners allow). Read only.
*/}}
{{- define "weft.proxyReadRules" -}}
{{- $weftResources := include "weft.crdPlurals" . -}}
# Namespaces (their labels), pods (identities and IPs of clients and backends) and services
# (VIPs, ports, waypoint bindings, the waypoints).
- apiGroups: [""]
  resources: [namespaces, pods, services]
  verbs: [get, list, watch]
# Backend endpoints.
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
{{- if $weftResources }}
# The weft CRDs shipped in crds/ (access policies, mTLS modes, traffic policies: connection
# pools and the rest of a backend's resilience, external services).
- apiGroups: [weft.dev]
  resources: [{{ $weftResources | replace "," ", " }}]
  verbs: [get, list, watch]
{{- end }}
# The routes.
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes, grpcroutes]
  verbs: [get, list, watch]
{{- end -}}

{{- /*
The environment both proxies take from the chart, besides their own: (dict "root" $ "proxy"
<entry>). The CA as the agent reaches it (agent.ca.remote of agent.yaml): same address, server
name and trust bundle, and a projected token with the same audience, but this pod's own: the
CA signs only this proxy's identity for it.
*/}}
{{- define "weft.proxyEnv" -}}
- name: WEFT_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: WEFT_SERVICE_ACCOUNT
  value: {{ .proxy.serviceAccount | quote }}
- name: WEFT_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: WEFT_TRUST_DOMAIN
  value: {{ .root.Values.trustDomain | quote }}
- name: WEFT_CA_ADDR
  value: {{ include "weft.caAddr" .root | quote }}
- name: WEFT_CA_SERVER_NAME
  value: {{ include "weft.caHost" .root | quote }}
- name: WEFT_CA_ROOT_CERT
  value: {{ include "weft.caRootCertPath" .root | quote }}
- name: WEFT_CA_TOKEN_FILE
  value: {{ include "weft.caTokenPath" .root | quote }}
- name: WEFT_LISTEN_GRACE
  value: {{ printf "%ds" (int .proxy.listenGraceSeconds) | quote }}
- name: WEFT_DRAIN_LIMIT
  value: {{ printf "%ds" (int .proxy.drainLimitSeconds) | quote }}
{{ include "weft.logEnv" (dict "root" .root "format" .proxy.logFormat) }}
{{- end -}}

{{- /*
The Deployment of one proxy: (dict "root" $ "component" … "proxy" <entry> "args" <list>, and
YAML text to add, each optional: "env" (its own variables), "ports" (its own container ports),
"mounts", "volumes", "podSecurity" (more keys of the pod's securityContext)).
*/}}
{{- define "weft.proxyDeployment" -}}
{{- $root := .root -}}
{{- $w := .proxy -}}
{{- $labels := dict "component" .component "name" $w.name "root" $root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $w.name }}
  namespace: {{ $w.namespace }}
  labels:
    {{- include "weft.proxyLabels" $labels | nindent 4 }}
spec:
  replicas: {{ int $w.replicas }}
  selector:
    matchLabels:
      {{- include "weft.proxySelectorLabels" $labels | nindent 6 }}
  strategy:
    # A new pod is ready before an old one goes: while no pod of a waypoint is ready, its
    # services' connections fail (fail closed, never around it), and a gateway without a
    # ready pod has no address behind its Service.
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "weft.proxyLabels" $labels | nindent 8 }}
        # Never enrolled: it speaks HBONE (mTLS) itself, a waypoint on its own 15008, a
        # gateway to its backends; a node proxy in front of it would take those connections.
        weft.dev/mesh: disabled
    spec:
      serviceAccountName: {{ $w.serviceAccount }}
      terminationGracePeriodSeconds: {{ int $w.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      affinity:
        {{- if $w.affinity }}
        {{- toYaml $w.affinity | nindent 8 }}
        {{- else }}
        # Prefer one pod per node, so that losing a node does not take all of them.
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels:
                    {{- include "weft.proxySelectorLabels" $labels | nindent 20 }}
        {{- end }}
      securityContext:
        # The projected CA token is readable by this group (the container runs as 65532).
        fsGroup: 65532
        {{- with .podSecurity }}
        {{- . | nindent 8 }}
        {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "weft.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: {{ .args | toJson }}
          env:
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "weft.proxyEnv" (dict "root" $root "proxy" $w) | nindent 12 }}
          ports:
            {{- with .ports }}
            {{- . | nindent 12 }}
            {{- end }}
            - name: metrics
              containerPort: 15020
              protocol: TCP
            - name: readiness
              containerPort: 15021
              protocol: TCP
          # Ready once it holds its certificate and its first snapshot (a gateway: and its
          # listeners are bound): only then is its pod an address of its Service. No liveness
          # probe: a slow proxy restarted is a proxy with fewer pods.
          readinessProbe:
            httpGet:
              path: /healthz/ready
              port: readiness
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 3
          resources:
            {{- toYaml $w.resources | nindent 12 }}
          # Non-root, read-only root filesystem, no privilege escalation and no capability
          # at all: ports in its own pod's network namespace (a gateway's under 1024 through
          # the pod's sysctl, gateway.yaml), ordinary outbound connections, no host path.
          securityContext:
            {{- include "weft.restrictedContainerSecurityContext" $root | nindent 12 }}
            privileged: false
          volumeMounts:
            {{- include "weft.caVolumeMounts" $root | nindent 12 }}
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "weft.caVolumes" $root | nindent 8 }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
{{- end -}}

{{- /*
A PodDisruptionBudget for one proxy, (dict "root" $ "component" … "proxy" <entry>): only when
enabled and with more than one replica (with one it would block every drain of that pod's
node; weft.proxies refuses a minAvailable that would).
*/}}
{{- define "weft.proxyPodDisruptionBudget" -}}
{{- $w := .proxy -}}
{{- $labels := dict "component" .component "name" $w.name "root" .root -}}
{{- if and $w.podDisruptionBudget.enabled (gt (int $w.replicas) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $w.name }}
  namespace: {{ $w.namespace }}
  labels:
    {{- include "weft.proxyLabels" $labels | nindent 4 }}
spec:
  minAvailable: {{ int $w.podDisruptionBudget.minAvailable }}
  selector:
    matchLabels:
      {{- include "weft.proxySelectorLabels" $labels | nindent 6 }}
{{- end }}
{{- end -}}

{{- /*
One ServiceMonitor `weft-<component>` in the release namespace for every proxy of a kind
(serviceMonitor.enabled): (dict "root" $ "component" … "proxies" <list> "selector" <YAML: the
labels of the Services to scrape, besides the component's>). Their port `metrics` (15020).
*/}}
{{- define "weft.proxyServiceMonitor" -}}
{{- $root := .root -}}
{{- $namespaces := list -}}
{{- range .proxies -}}
{{- $namespaces = append $namespaces .namespace -}}
{{- end -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: weft-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "weft.componentLabels" (dict "component" .component "root" $root) | nindent 4 }}
    {{- with $root.Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "weft.selectorLabels" (dict "component" .component "root" $root) | nindent 6 }}
      {{- .selector | nindent 6 }}
  namespaceSelector:
    matchNames: {{ $namespaces | uniq | sortAlpha | toJson }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ $root.Values.serviceMonitor.interval | quote }}
      scrapeTimeout: {{ $root.Values.serviceMonitor.scrapeTimeout | quote }}
{{- end -}}
