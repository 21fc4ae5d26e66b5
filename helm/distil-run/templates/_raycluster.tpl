{{/*
The Ray cluster of a run -- its head, its GPU worker groups (one training worker per GPU) and
the optional data-preparation pods -- as the spec of a RayCluster (mode: cluster) or of a
RayJob's rayClusterSpec (mode: job). Its pods are made of the pieces in _helpers.tpl (names,
labels, container, pod fields); the checks are in _validate.tpl.
*/}}
{{- define "distil-run.rayClusterSpec" -}}
rayVersion: "2.60.0"
{{- if gt (int64 .Values.dataWorkers.replicas) 0 }}
# The autoscaler only ever removes the idle data-preparation pods: the GPU groups are busy
# training (an elastic group's pods are recreated by KubeRay up to its replicas).
enableInTreeAutoscaling: true
autoscalerOptions:
  idleTimeoutSeconds: {{ int64 .Values.dataWorkers.idleTimeoutSeconds }}
  upscalingMode: Conservative
{{- end }}
headGroupSpec:
  rayStartParams:
    num-gpus: "0"
    {{- $params := deepCopy .Values.head.rayStartParams }}
    {{- include "distil-run.intify" $params }}
    {{- range $k, $v := $params }}
    {{ $k }}: {{ $v | quote }}
    {{- end }}
  template:
    metadata:
      {{- include "distil-run.podMetadata" (dict "root" . "component" "ray-head" "group" "") | nindent 6 }}
    spec:
      {{- include "distil-run.podFields" (dict "root" . "shm" "1Gi" "sched" .Values.head) | nindent 6 }}
      containers:
        {{- include "distil-run.container" (dict "root" . "name" "ray-head" "resources" .Values.head.resources "gpus" 0) | nindent 8 }}
          ports:
            - {name: gcs, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}
            - {name: client, containerPort: 10001}
workerGroupSpecs:
  {{- range .Values.workerGroups }}
  - groupName: {{ .name }}
    # An elastic group (minReplicas below replicas) is kept at replicas by KubeRay's plain replica
    # recreation: a pod lost with its spot node is created again at once, waits Pending for
    # capacity, and joins the run at Ray Train's next resize check. The autoscaler never shrinks it.
    replicas: {{ int64 .replicas }}
    minReplicas: {{ include "distil-run.groupMin" . }}
    maxReplicas: {{ int64 .replicas }}
    rayStartParams:
      num-gpus: {{ int64 .gpusPerPod | quote }}
    template:
      metadata:
        {{- include "distil-run.podMetadata" (dict "root" $ "component" "ray-worker" "group" .name) | nindent 8 }}
      spec:
        {{- include "distil-run.podFields" (dict "root" $ "shm" .shmSize "sched" .) | nindent 8 }}
        containers:
          {{- include "distil-run.container" (dict "root" $ "name" "ray-worker" "resources" .resources "gpus" .gpusPerPod) | nindent 10 }}
  {{- end }}
  {{- with .Values.dataWorkers }}
  {{- if gt (int64 .replicas) 0 }}
  # CPU pods for the data preparation's Ray Data tasks (training workers need a GPU, so they
  # never land here); removed by the autoscaler once idle.
  - groupName: data
    replicas: {{ int64 .replicas }}
    minReplicas: 0
    maxReplicas: {{ int64 .replicas }}
    rayStartParams:
      num-gpus: "0"
    template:
      metadata:
        {{- include "distil-run.podMetadata" (dict "root" $ "component" "ray-data-worker" "group" "data") | nindent 8 }}
      spec:
        {{- include "distil-run.podFields" (dict "root" $ "shm" "1Gi" "sched" .) | nindent 8 }}
        containers:
          {{- include "distil-run.container" (dict "root" $ "name" "ray-worker" "resources" .resources "gpus" 0) | nindent 10 }}
  {{- end }}
  {{- end }}
{{- end }}
