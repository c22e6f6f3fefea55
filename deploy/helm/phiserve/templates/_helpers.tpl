{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "phiserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. KubeRay derives longer names from the RayService name
(<name>-raycluster-xxxxx-head-svc), so it is kept to 40 characters.
*/}}
{{- define "phiserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "phiserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "phiserve.labels" -}}
helm.sh/chart: {{ include "phiserve.chart" . }}
{{ include "phiserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: phiserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of pod templates: no chart version, so a chart upgrade alone does not roll the Ray
cluster (KubeRay replaces the whole RayCluster when a pod template changes).
*/}}
{{- define "phiserve.podLabels" -}}
{{ include "phiserve.selectorLabels" . }}
app.kubernetes.io/part-of: phiserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels that select the release's pods (never change them on upgrade). */}}
{{- define "phiserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "phiserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Names of the release's objects. */}}
{{- define "phiserve.redisName" -}}{{ include "phiserve.fullname" . }}-redis{{- end }}
{{- define "phiserve.gatewayName" -}}{{ include "phiserve.fullname" . }}-gateway{{- end }}
{{- define "phiserve.catalogName" -}}{{ include "phiserve.fullname" . }}-catalog{{- end }}

{{- define "phiserve.adminKeySecretName" -}}
{{- default (printf "%s-admin-key" (include "phiserve.fullname" .)) .Values.adminKey.existingSecret }}
{{- end }}

{{- define "phiserve.cacheSaltSecretName" -}}
{{- default (printf "%s-cache-salt" (include "phiserve.fullname" .)) .Values.cacheSaltSecret.existingSecret }}
{{- end }}

{{- define "phiserve.tenantsSecretName" -}}
{{- default (printf "%s-tenants" (include "phiserve.fullname" .)) .Values.tenants.existingSecret }}
{{- end }}

{{- define "phiserve.redisUrlSecretName" -}}
{{- default (printf "%s-redis-url" (include "phiserve.fullname" .)) .Values.redis.external.existingSecret }}
{{- end }}

{{/*
Ray custom resource a pool's worker group advertises: phiserve pins the pool's replicas to it
(settings.pool_placement: pool_nodes). The name must equal services/catalog/placement.py
pool_resource(), which the deploy tests check through the deployments phiserve builds.
*/}}
{{- define "phiserve.poolResource" -}}
phiserve_pool_{{ . | replace "-" "_" }}
{{- end }}

{{/* Mount paths shared by the Ray pods and serveConfigV2. */}}
{{- define "phiserve.catalogPath" -}}/etc/phiserve/catalog/catalog.yaml{{- end }}
{{- define "phiserve.tenantsDir" -}}/etc/phiserve/tenants{{- end }}

{{/* Image reference: repository:tag (tag defaults to the chart's appVersion). */}}
{{- define "phiserve.image" -}}
{{- $image := .image -}}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/*
The pod spec shared by the Ray head and every worker group.
Call with (dict "root" $ "component" "ray-head"|"ray-worker" "group" <head or pool worker values>).
*/}}
{{- define "phiserve.rayPodSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .group }}
{{- $image := mergeOverwrite (deepCopy $v.image) (default dict $g.image) }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
automountServiceAccountToken: {{ and (eq .component "ray-head") $v.autoscaling.enabled }}
{{- with (default $v.ray.priorityClassName $g.priorityClassName) }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ $v.ray.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .component }}
    image: {{ include "phiserve.image" (dict "image" $image "root" $root) }}
    imagePullPolicy: {{ $image.pullPolicy }}
    ports:
      {{- if eq .component "ray-head" }}
      - {name: gcs-server, containerPort: 6379, protocol: TCP}
      - {name: dashboard, containerPort: 8265, protocol: TCP}
      - {name: client, containerPort: 10001, protocol: TCP}
      {{- end }}
      - {name: serve, containerPort: {{ $v.serve.httpPort }}, protocol: TCP}
      {{- if $v.settings.grpc_port }}
      - {name: grpc, containerPort: {{ int $v.settings.grpc_port }}, protocol: TCP}
      {{- end }}
      - {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
      - {name: dashboard-agent, containerPort: 52365, protocol: TCP}
    env:
      - name: PHISERVE_REDIS_URL
        {{- if $v.redis.external.enabled }}
        valueFrom:
          secretKeyRef:
            name: {{ include "phiserve.redisUrlSecretName" $root }}
            key: {{ $v.redis.external.existingSecretKey }}
        {{- else }}
        value: {{ printf "redis://%s:6379/0" (include "phiserve.redisName" $root) | quote }}
        {{- end }}
      - name: PHISERVE_ADMIN_KEY
        valueFrom:
          secretKeyRef:
            name: {{ include "phiserve.adminKeySecretName" $root }}
            key: {{ $v.adminKey.existingSecretKey }}
      - name: PHISERVE_CACHE_SALT_SECRET
        valueFrom:
          secretKeyRef:
            name: {{ include "phiserve.cacheSaltSecretName" $root }}
            key: {{ $v.cacheSaltSecret.existingSecretKey }}
      {{- if $v.tenants.enabled }}
      - name: PHISERVE_TENANTS_FILE
        value: {{ printf "%s/%s" (include "phiserve.tenantsDir" $root) $v.tenants.existingSecretKey | quote }}
      {{- end }}
      {{- if $v.huggingface.existingSecret }}
      - name: HF_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $v.huggingface.existingSecret }}
            key: {{ $v.huggingface.existingSecretKey }}
      {{- end }}
      - {name: HOME, value: /home/phiserve}
      - {name: HF_HOME, value: /models-cache/huggingface}
      - {name: PYTHONDONTWRITEBYTECODE, value: "1"}
      - {name: RAY_USAGE_STATS_ENABLED, value: "0"}
      - {name: VLLM_NO_USAGE_STATS, value: "1"}
      {{- if $v.serve.throughputOptimized }}
      # Serve's throughput-optimized mode (gRPC between deployments; services/ray_env.py). The
      # Service targets Serve's proxy port, so direct ingress stays off; log lines are written
      # as they come, not 1,000 at a time.
      - {name: RAY_SERVE_THROUGHPUT_OPTIMIZED, value: "1"}
      - {name: RAY_SERVE_ENABLE_DIRECT_INGRESS, value: "0"}
      - {name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE, value: "1"}
      {{- end }}
      {{- with $v.ray.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    resources:
      {{- $resources := deepCopy (default dict $g.resources) }}
      {{- if gt (int (default 0 $g.gpus)) 0 }}
      {{- $limits := mergeOverwrite (default dict $resources.limits) (dict "nvidia.com/gpu" ($g.gpus | toString)) }}
      {{- $requests := mergeOverwrite (default dict $resources.requests) (dict "nvidia.com/gpu" ($g.gpus | toString)) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- $_ := set $resources "requests" $requests }}
      {{- end }}
      {{- toYaml $resources | nindent 6 }}
    {{- if eq .component "ray-head" }}
    # Ready when the GCS answers; alive while the node's raylet answers.
    readinessProbe:
      httpGet: {path: /api/gcs_healthz, port: dashboard}
      {{- toYaml $v.ray.probes.readiness | nindent 6 }}
    {{- else }}
    # Ready when this node's Serve proxy answers (KubeRay's rule for RayService workers:
    # a worker without a proxy takes no traffic); alive while the raylet answers.
    readinessProbe:
      httpGet: {path: /-/healthz, port: serve}
      {{- toYaml $v.ray.probes.readiness | nindent 6 }}
    {{- end }}
    livenessProbe:
      httpGet: {path: /api/local_raylet_healthz, port: dashboard-agent}
      {{- toYaml $v.ray.probes.liveness | nindent 6 }}
    securityContext:
      {{- toYaml $v.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - {name: tmp, mountPath: /tmp}
      - {name: ray-tmp, mountPath: /tmp/ray}
      - {name: home, mountPath: /home/phiserve}
      - {name: dshm, mountPath: /dev/shm}
      - {name: models-cache, mountPath: /models-cache}
      - {name: batch-files, mountPath: {{ $v.batchFiles.mountPath }}}
      - {name: adapters, mountPath: {{ $v.adapters.mountPath }}}
      {{- range $name, $extra := $v.adapters.extraRoots }}
      - {name: adapters-{{ $name }}, mountPath: {{ $extra.mountPath }}, readOnly: true}
      {{- end }}
      - {name: catalog, mountPath: /etc/phiserve/catalog, readOnly: true}
      {{- if $v.tenants.enabled }}
      - {name: tenants, mountPath: {{ include "phiserve.tenantsDir" $root }}, readOnly: true}
      {{- end }}
volumes:
  - name: tmp
    emptyDir: {sizeLimit: {{ $v.ray.tmpSizeLimit }}}
  - name: ray-tmp
    emptyDir: {sizeLimit: {{ $v.ray.rayTmpSizeLimit }}}
  - name: home
    emptyDir: {sizeLimit: {{ $v.ray.homeSizeLimit }}}
  - name: dshm
    emptyDir: {medium: Memory, sizeLimit: {{ $g.shmSize }}}
  - name: models-cache
    {{- if $v.modelCache.existingClaim }}
    persistentVolumeClaim:
      claimName: {{ $v.modelCache.existingClaim }}
    {{- else }}
    emptyDir: {sizeLimit: {{ $v.modelCache.sizeLimit }}}
    {{- end }}
  - name: batch-files
    {{- if $v.batchFiles.existingClaim }}
    persistentVolumeClaim:
      claimName: {{ $v.batchFiles.existingClaim }}
    {{- else }}
    emptyDir: {sizeLimit: {{ $v.batchFiles.sizeLimit }}}
    {{- end }}
  - name: adapters
    {{- if $v.adapters.existingClaim }}
    persistentVolumeClaim:
      claimName: {{ $v.adapters.existingClaim }}
    {{- else }}
    emptyDir: {sizeLimit: {{ $v.adapters.sizeLimit }}}
    {{- end }}
  {{- range $name, $extra := $v.adapters.extraRoots }}
  - name: adapters-{{ $name }}
    persistentVolumeClaim:
      claimName: {{ $extra.claimName }}
      readOnly: true
  {{- end }}
  - name: catalog
    configMap:
      name: {{ include "phiserve.catalogName" $root }}
  {{- if $v.tenants.enabled }}
  - name: tenants
    secret:
      secretName: {{ include "phiserve.tenantsSecretName" $root }}
      defaultMode: 0440
  {{- end }}
{{- end }}

{{/*
The model catalog YAML (services/catalog/models.py Catalog) rendered from values, entries as
written: placement is not the catalog's business (phiserve adds each pool's Ray resource to its
replicas itself when settings.pool_placement is pool_nodes, issue 15).
*/}}
{{- define "phiserve.catalog" -}}
{{- $pools := list }}
{{- $enabled := 0 }}
{{- range $name, $pool := .Values.pools }}
{{- $entry := deepCopy $pool.catalog }}
{{- $_ := set $entry "name" $name }}
{{- $_ := set $entry "enabled" $pool.enabled }}
{{- $deployment := deepCopy $entry.deployment }}
{{- /* Helm drops keys set to null, but the catalog needs num_replicas: null to autoscale. */}}
{{- if and $deployment.autoscaling (not (hasKey $deployment "num_replicas")) }}
{{- $_ := set $deployment "num_replicas" nil }}
{{- end }}
{{- $_ := set $entry "deployment" $deployment }}
{{- $pools = append $pools $entry }}
{{- if $pool.enabled }}{{ $enabled = add1 $enabled }}{{ end }}
{{- end }}
{{- if eq $enabled 0 }}
{{- fail "pools: enable at least one pool" }}
{{- end }}
{{- toYaml (dict "platform" .Values.catalog.platform "pools" $pools) }}
{{- end }}

{{/* minAvailable or maxUnavailable of a PodDisruptionBudget (values.schema.json allows one). */}}
{{- define "phiserve.pdbBudget" -}}
{{- if hasKey . "minAvailable" }}
minAvailable: {{ .minAvailable }}
{{- else }}
maxUnavailable: {{ .maxUnavailable }}
{{- end }}
{{- end }}
