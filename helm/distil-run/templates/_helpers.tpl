{{/* Chart name, at most 63 characters. */}}
{{- define "distil-run.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, at most 63 characters (DNS label). */}}
{{- define "distil-run.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "distil-run.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "distil-run.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distil-run.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels. */}}
{{- define "distil-run.labels" -}}
helm.sh/chart: {{ include "distil-run.chart" . }}
{{ include "distil-run.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distil-run
distil-run/run: {{ include "distil-run.runLabel" . }}
{{- end }}

{{/* The run's name as `distil k8s status/resume` look it up: config.run.name in lowercase
with "-" for other characters (distil/k8s.py `k8s_name`, the same rule). */}}
{{- define "distil-run.runLabel" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower (default "" (default dict .Values.config.run).name)) "-" | trimAll "-" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "distil-run.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "distil-run.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "distil-run.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Training workers: one per GPU over all worker groups (an elastic run's most). */}}
{{- define "distil-run.numWorkers" -}}
{{- $n := 0 }}
{{- range .Values.workerGroups }}
{{- $n = add $n (mul .replicas .gpusPerPod) }}
{{- end }}
{{- $n }}
{{- end }}

{{/* The fewest training workers the run goes on with: each group's minReplicas (default: its replicas). */}}
{{- define "distil-run.minWorkers" -}}
{{- $n := 0 }}
{{- range .Values.workerGroups }}
{{- $n = add $n (mul (include "distil-run.groupMin" .) .gpusPerPod) }}
{{- end }}
{{- $n }}
{{- end }}

{{- define "distil-run.groupMin" -}}
{{- if kindIs "invalid" .minReplicas }}{{ int64 .replicas }}{{ else }}{{ int64 .minReplicas }}{{ end }}
{{- end }}

{{/* The run config: the user's config with `scaling` filled in from the worker groups. */}}
{{- define "distil-run.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $scaling := default dict $config.scaling }}
{{- $min := int (include "distil-run.minWorkers" .) }}
{{- $max := int (include "distil-run.numWorkers" .) }}
{{- /* a number, or [min, max] for an elastic run (minReplicas below replicas) */}}
{{- $_ := set $scaling "num_workers" (ternary (list $min $max) $max (lt $min $max)) }}
{{- $_ := set $scaling "use_gpu" true }}
{{- $_ := set $scaling "gpus_per_worker" 1 }}
{{- $_ := set $config "scaling" $scaling }}
{{- include "distil-run.intify" $config }}
{{- toYaml $config }}
{{- end }}

{{/* Environment of every Ray container: S3 credentials by reference, never by value. */}}
{{- define "distil-run.env" -}}
- name: HF_HOME
  value: /tmp/hf
- name: TORCH_EXTENSIONS_DIR
  value: /tmp/torch_extensions
{{- with .Values.storage.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.secretAccessKeyKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* One Ray container (head or worker). Args: dict root, name, resources, gpus. */}}
{{- define "distil-run.container" -}}
{{- $root := .root }}
- name: {{ .name }}
  image: {{ include "distil-run.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  env:
    {{- include "distil-run.env" $root | nindent 4 }}
  resources:
    {{- $res := deepCopy .resources }}
    {{- include "distil-run.intify" $res }}
    {{- if .gpus }}
    {{- $limits := default dict $res.limits }}
    {{- $_ := set $limits "nvidia.com/gpu" (int64 .gpus) }}
    {{- $_ := set $res "limits" $limits }}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  {{- if .gpus }}
  # Before SIGTERM: the workers finish their step, checkpoint to storage, then the pod may go.
  lifecycle:
    preStop:
      exec:
        command: ["python", "-m", "distil.runs.preempt", "--timeout", "{{ sub (int64 $root.Values.terminationGracePeriodSeconds) 15 }}"]
  {{- end }}
  volumeMounts:
    - name: distil-config
      mountPath: /etc/distil
      readOnly: true
    - name: dshm
      mountPath: /dev/shm
    - name: tmp
      mountPath: /tmp
    {{- with $root.Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Pod-level fields shared by head and workers. Args: dict root, shm, sched (nodeSelector etc.). */}}
{{- define "distil-run.podFields" -}}
{{- $root := .root }}
serviceAccountName: {{ include "distil-run.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
terminationGracePeriodSeconds: {{ int64 $root.Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with .sched.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .sched.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .sched.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .sched.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: distil-config
    configMap:
      name: {{ include "distil-run.fullname" $root }}-config
  - name: dshm
    emptyDir:
      medium: Memory
      {{- with .shm }}
      sizeLimit: {{ . }}
      {{- end }}
  - name: tmp
    emptyDir: {}
  {{- with $root.Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Metadata of a Ray pod template. Args: dict root, component, group (or ""), indent. */}}
{{- define "distil-run.podMetadata" -}}
labels:
  {{- include "distil-run.labels" .root | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .group }}
  distil-run/worker-group: {{ . }}
  {{- end }}
{{- with .root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A value as one shell word: single-quoted, each ' written as '\'' (KubeRay runs the entrypoint
in a shell; inside double quotes $(...) and `...` would still run). */}}
{{- define "distil-run.shellQuote" -}}
'{{ replace "'" "'\\''" (toString .) }}'
{{- end }}
