{{/*
Inconsistent or unsafe values fail `helm install` / `helm template` here, with what to change.
Included by configmap.yaml (so every render checks) and NOTES.txt.
*/}}

{{/* Key names that hold credentials. The same pattern as distil.secrets.SECRET_KEY (a test
compares them): such keys are refused in `config`, `job.extraArgs`, `head.rayStartParams` and as
the names of literal `extraEnv` values. */}}
{{- define "distil-run.secretPattern" -}}
(?i)(token|secret|passw|credential|private[_-]?key|api[_-]?key|access[_-]?key|(^|[_-])(auth|key|pass|pwd|dsn)($|[_-]))
{{- end }}

{{/* "yes" when a string is a URI that carries a credential: user information before the host, or
a query parameter named like a credential or a signature (distil.secrets.uri_problem, the same
rule; a test compares them). */}}
{{- define "distil-run.uriHasCredentials" -}}
{{- $v := trim (toString .) }}
{{- $scheme := "^[A-Za-z][A-Za-z0-9+.-]*://" }}
{{- if regexMatch (printf "%s[^/?#]*@" $scheme) $v }}yes
{{- else if regexMatch (printf "%s[^?#]*[?#]" $scheme) $v }}
{{- range splitList "&" (regexReplaceAll (printf "%s[^?#]*[?#]" $scheme) $v "") }}
{{- $name := first (splitList "=" .) }}
{{- if or (regexMatch (include "distil-run.secretPattern" nil) $name) (regexMatch "(?i)(signature|^sig$)" $name) }}yes{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Paths of the strings in a nested value that are URIs with credentials, one a line. Args: dict path, value. */}}
{{- define "distil-run.credentialUris" -}}
{{- if kindIs "string" .value }}
{{- if include "distil-run.uriHasCredentials" .value }}{{ .path }}{{ "\n" }}{{ end }}
{{- else if kindIs "map" .value }}
{{- range $k, $v := .value }}{{ include "distil-run.credentialUris" (dict "path" (printf "%s.%s" $.path $k) "value" $v) }}{{ end }}
{{- else if kindIs "slice" .value }}
{{- range $i, $v := .value }}{{ include "distil-run.credentialUris" (dict "path" (printf "%s[%d]" $.path $i) "value" $v) }}{{ end }}
{{- end }}
{{- end }}

{{/* Paths of credential-like keys in a nested map, one a line. Args: dict path, value. */}}
{{- define "distil-run.secretKeys" -}}
{{- $pattern := include "distil-run.secretPattern" nil }}
{{- range $k, $v := .value }}
{{- $path := printf "%s.%s" $.path $k }}
{{- if regexMatch $pattern (toString $k) }}{{ $path }}{{ "\n" }}{{ end }}
{{- if kindIs "map" $v }}{{ include "distil-run.secretKeys" (dict "path" $path "value" $v) }}{{ end }}
{{- if kindIs "slice" $v }}
{{- range $i, $e := $v }}
{{- if kindIs "map" $e }}{{ include "distil-run.secretKeys" (dict "path" (printf "%s[%d]" $path $i) "value" $e) }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity ("8", "500m", "48Gi", "1e3", 8) as a plain number, for comparisons. */}}
{{- define "distil-run.quantity" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9.]+" $q }}
{{- $suffix := trimPrefix $num $q }}
{{- $scale := dict "" 1.0 "n" 1e-9 "u" 1e-6 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- if hasKey $scale $suffix }}
{{- mulf (float64 $num) (get $scale $suffix) }}
{{- else if regexMatch "^[eE][0-9]+$" $suffix }}
{{- mulf (float64 $num) (float64 (printf "1%s" $suffix)) }}
{{- else }}
{{- fail (printf "%q is not a Kubernetes quantity (e.g. 8, 500m, 48Gi)" $q) }}
{{- end }}
{{- end }}

{{/* Requests above limits. Args: dict where, resources. */}}
{{- define "distil-run.checkResources" -}}
{{- $requests := default dict .resources.requests }}
{{- $limits := default dict .resources.limits }}
{{- range $k, $v := $requests }}
{{- if hasKey $limits $k }}
{{- if gt (float64 (include "distil-run.quantity" $v)) (float64 (include "distil-run.quantity" (get $limits $k))) }}
{{- fail (printf "%s: requests.%s %v is above limits.%s %v: the API server refuses the pod; raise the limit or lower the request" $.where $k $v $k (get $limits $k)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "distil-run.validate" -}}
{{- $workers := int (include "distil-run.numWorkers" .) }}
{{- if lt $workers 1 }}
{{- fail "workerGroups: no GPU worker (replicas x gpusPerPod is 0): add a group with replicas >= 1 and gpusPerPod >= 1" }}
{{- end }}
{{- /* Object names: KubeRay appends to them (RayJob -> RayCluster -> pods, services). */}}
{{- $name := include "distil-run.fullname" . }}
{{- $max := ternary 47 53 (eq .Values.mode "job") }}
{{- $kind := ternary "RayJob" "RayCluster" (eq .Values.mode "job") }}
{{- if or (gt (len $name) $max) (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name)) }}
{{- fail (printf "the %s name %q (release name + chart name) is not a DNS-1035 label of at most %d characters (lowercase letters, digits and '-', starting with a letter), as KubeRay requires: use a shorter release name or set fullnameOverride" $kind $name $max) }}
{{- end }}
{{- $groups := list }}
{{- range .Values.workerGroups }}
{{- if has .name $groups }}
{{- fail (printf "workerGroups: two groups are named %q: give each a name of its own" .name) }}
{{- end }}
{{- $groups = append $groups .name }}
{{- include "distil-run.checkResources" (dict "where" (printf "workerGroups[%s].resources" .name) "resources" .resources) }}
{{- if and (not (kindIs "invalid" .minReplicas)) (gt (int64 .minReplicas) (int64 .replicas)) }}
{{- fail (printf "workerGroups[%s]: minReplicas %v is more than replicas %v: replicas is the most the run trains on, minReplicas the fewest it goes on with" .name .minReplicas .replicas) }}
{{- end }}
{{- end }}
{{- $least := int (include "distil-run.minWorkers" .) }}
{{- if lt $least 1 }}
{{- fail "workerGroups: every group's minReplicas is 0: an elastic run needs at least one GPU worker to go on with; raise a minReplicas" }}
{{- end }}
{{- /* Kueue (kueue.x-k8s.io): what it requires of a RayJob it admits. */}}
{{- if .Values.kueue.queueName }}
{{- if ne .Values.mode "job" }}
{{- fail "kueue.queueName is set but mode is cluster: the chart puts a RayJob on a Kueue queue; use mode: job, or unset kueue.queueName" }}
{{- end }}
{{- if not .Values.job.shutdownAfterJobFinishes }}
{{- fail "kueue.queueName is set but job.shutdownAfterJobFinishes is false: Kueue requires a RayJob to delete its cluster when it ends (its quota is released then); set it true" }}
{{- end }}
{{- if and (gt (int64 .Values.dataWorkers.replicas) 0) (not (lt $least $workers)) }}
{{- fail "kueue.queueName is set with dataWorkers.replicas > 0: Kueue reserves a fixed-size cluster and requires KubeRay's autoscaler off unless the job is elastic; set dataWorkers.replicas 0 (the head and GPU pods prepare the data), or make the run elastic (a minReplicas below replicas)" }}
{{- end }}
{{- if gt (len (concat .Values.workerGroups (ternary (list 1) (list) (gt (int64 .Values.dataWorkers.replicas) 0)))) 7 }}
{{- fail "kueue.queueName is set with more than 7 worker groups (data workers included): a Kueue workload has at most 8 pod sets, the head's among them" }}
{{- end }}
{{- end }}
{{- include "distil-run.checkResources" (dict "where" "head.resources" "resources" .Values.head.resources) }}
{{- include "distil-run.checkResources" (dict "where" "job.submitterResources" "resources" .Values.job.submitterResources) }}
{{- /* The run config against the cluster's shape. */}}
{{- $scaling := default dict .Values.config.scaling }}
{{- $expected := ternary (printf "[%d %d]" $least $workers) (toString $workers) (lt $least $workers) }}
{{- if and (hasKey $scaling "num_workers") (ne (toString $scaling.num_workers) $expected) }}
{{- fail (printf "config.scaling.num_workers is %v but the worker groups give %s GPU workers (one per GPU; [min max] when a minReplicas is below replicas): remove config.scaling.num_workers (the chart sets it) or change workerGroups" (toString $scaling.num_workers) $expected) }}
{{- end }}
{{- if and (hasKey $scaling "use_gpu") (not $scaling.use_gpu) }}
{{- fail "config.scaling.use_gpu is false but the chart runs GPU workers: remove config.scaling.use_gpu" }}
{{- end }}
{{- $train := default dict .Values.config.train }}
{{- $micro := int (default 8 $train.micro_batch_size) }}
{{- $global := int (default 8 $train.global_batch_size) }}
{{- range $n := untilStep $least (int (add $workers 1)) 1 }}
{{- if mod $global (mul $micro $n) }}
{{- fail (printf "config.train.global_batch_size %d is not a multiple of micro_batch_size %d x %d GPU workers = %d%s: change the batch sizes or the worker groups" $global $micro $n (mul $micro $n) (ternary (printf " (an elastic run trains on any count from %d to %d)" $least $workers) "" (lt $least $workers))) }}
{{- end }}
{{- end }}
{{- $storage := default dict .Values.config.storage }}
{{- $uri := default "" $storage.uri }}
{{- if not (hasPrefix "s3://" $uri) }}
{{- fail (printf "config.storage.uri is %q: on Kubernetes checkpoints must go to object storage (s3://bucket/prefix, with endpoint_url for MinIO/Ceph/R2); pod disks are lost on preemption" $uri) }}
{{- end }}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/]*@" (default "" $storage.endpoint_url) }}
{{- fail "config.storage.endpoint_url holds credentials (user:password@): they would be written into the ConfigMap; put them in a Secret and set storage.credentialsSecret" }}
{{- end }}
{{- /* Credentials never go into values: by key name, anywhere. */}}
{{- $secrets := include "distil-run.secretKeys" (dict "path" "config" "value" .Values.config) }}
{{- $secrets = cat $secrets (include "distil-run.secretKeys" (dict "path" "head.rayStartParams" "value" .Values.head.rayStartParams)) }}
{{- range $i, $e := .Values.extraEnv }}
{{- if and (hasKey $e "value") (regexMatch (include "distil-run.secretPattern" nil) (toString $e.name)) }}
{{- $secrets = cat $secrets (printf "extraEnv[%d].value" $i) }}
{{- end }}
{{- end }}
{{- range .Values.job.extraArgs }}
{{- if regexMatch (include "distil-run.secretPattern" nil) (first (splitList "=" .)) }}
{{- $secrets = cat $secrets (printf "job.extraArgs[%s]" (first (splitList "=" .))) }}
{{- end }}
{{- end }}
{{- /* ... and never inside a URI (s3://KEY:SECRET@bucket, https://user:token@host, ?token=) */}}
{{- $secrets = cat $secrets (include "distil-run.credentialUris" (dict "path" "config" "value" .Values.config)) }}
{{- $secrets = cat $secrets (include "distil-run.credentialUris" (dict "path" "head.rayStartParams" "value" .Values.head.rayStartParams)) }}
{{- range $i, $e := .Values.extraEnv }}
{{- if and (hasKey $e "value") (include "distil-run.uriHasCredentials" $e.value) }}
{{- $secrets = cat $secrets (printf "extraEnv[%d].value" $i) }}
{{- end }}
{{- end }}
{{- range .Values.job.extraArgs }}
{{- $arg := . }}
{{- /* the value is YAML (a list, a quoted string): each word of it is looked at */}}
{{- range regexSplit "[\\[\\],'\"\\s]+" (join "=" (rest (splitList "=" $arg))) -1 }}
{{- if include "distil-run.uriHasCredentials" . }}
{{- $secrets = cat $secrets (printf "job.extraArgs[%s]" (first (splitList "=" $arg))) }}
{{- end }}
{{- end }}
{{- end }}
{{- if trim $secrets }}
{{- fail (printf "%s: credentials never go into values (they end up in the ConfigMap, the RayJob and every checkpoint's config), neither as a key nor inside a URI (user:password@host, ?token=); put S3 keys in a Secret (storage.credentialsSecret) and other tokens in the pods' environment from a Secret" (join ", " (uniq (splitList " " (trim (regexReplaceAll "\\s+" $secrets " ")))))) }}
{{- end }}
{{- /* extraArgs are `--set` overrides of the config: not of what the chart sets or checks above. */}}
{{- range .Values.job.extraArgs }}
{{- $key := first (splitList "=" .) }}
{{- if regexMatch "^(storage|scaling|run)(\\.|$)|^train\\.(micro|global)_batch_size$" $key }}
{{- fail (printf "job.extraArgs sets %s, which the chart checks (storage in object storage, the batch split over the GPUs, the run name) or sets itself (scaling): set it under config instead" $key) }}
{{- end }}
{{- end }}
{{- /* KubeRay writes rayStartParams into the `ray start` command line of a shell. */}}
{{- range $k, $v := .Values.head.rayStartParams }}
{{- if regexMatch "[$`;|&<>\\\\\n()]" (toString $v) }}
{{- fail (printf "head.rayStartParams.%s holds a shell character ($ ` ; | & < > ( ), a backslash or a newline): KubeRay puts it in the `ray start` command line unquoted; give a plain value" $k) }}
{{- end }}
{{- end }}
{{- /* Labels the chart sets on every pod: another value would duplicate the key, and hide the run from `distil k8s`. */}}
{{- range $k, $v := .Values.podLabels }}
{{- if or (hasPrefix "distil-run/" $k) (hasPrefix "app.kubernetes.io/" $k) (hasPrefix "helm.sh/" $k) (hasPrefix "ray.io/" $k) }}
{{- fail (printf "podLabels.%s: the chart sets the distil-run/*, app.kubernetes.io/*, helm.sh/* labels (and KubeRay the ray.io/* ones) itself; `distil k8s status` finds a run by distil-run/run (config.run.name); choose another label key" $k) }}
{{- end }}
{{- end }}
{{- $run := default dict .Values.config.run }}
{{- if not (default "" $run.name) }}
{{- fail "config.run.name is empty: set it, so that a resubmitted or resumed job finds its checkpoints" }}
{{- end }}
{{- end }}

{{/* Whole numbers from a values file are float64 in Helm, and toYaml writes 1209600 as
1.2096e+06 (which the API server and distil refuse as an integer): turn them back into
integers, in place, through maps and lists. */}}
{{- define "distil-run.intify" -}}
{{- range $k, $v := . }}
{{- if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) }}
{{- $_ := set $ $k (int64 $v) }}
{{- else if kindIs "map" $v }}
{{- include "distil-run.intify" $v }}
{{- else if kindIs "slice" $v }}
{{- $out := list }}
{{- range $v }}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- $out = append $out (int64 .) }}
{{- else }}
{{- if kindIs "map" . }}{{ include "distil-run.intify" . }}{{ end }}
{{- $out = append $out . }}
{{- end }}
{{- end }}
{{- $_ := set $ $k $out }}
{{- end }}
{{- end }}
{{- end }}
