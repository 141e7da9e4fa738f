{{/*
Chart name, truncated to 63 characters (DNS label).
*/}}
{{- define "dreambooth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Truncated to 40 characters so that "<fullname>-<suffix>" names
stay valid: KubeRay limits RayCluster names to 53 and RayJob names to 47 characters.
*/}}
{{- define "dreambooth.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "dreambooth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "dreambooth.labels" -}}
helm.sh/chart: {{ include "dreambooth.chart" . }}
{{ include "dreambooth.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "dreambooth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dreambooth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount that submits RayJobs.
*/}}
{{- define "dreambooth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dreambooth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the shared RayCluster (also its `ray.io/cluster` label, which RayJobs select on).
*/}}
{{- define "dreambooth.clusterName" -}}
{{- include "dreambooth.fullname" . }}
{{- end }}

{{/*
Name of the Secret holding the shared RayCluster's auth token (key `auth_token`):
auth.existingSecret, else the one the KubeRay operator generates, named after the RayCluster.
(The chart itself never renders a token: renders stay deterministic.)
*/}}
{{- define "dreambooth.authSecretName" -}}
{{- default (include "dreambooth.clusterName" .) .Values.auth.existingSecret }}
{{- end }}

{{/*
Name of the shared-storage PVC.
*/}}
{{- define "dreambooth.pvcName" -}}
{{- default (printf "%s-shared" (include "dreambooth.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{/*
Image reference.
*/}}
{{- define "dreambooth.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
RayJob name for a subject: (list $ $subject).
*/}}
{{- define "dreambooth.jobName" -}}
{{- $root := index . 0 }}
{{- $s := index . 1 }}
{{- printf "%s-%s" (include "dreambooth.fullname" $root) $s.name | trunc 47 | trimSuffix "-" }}
{{- end }}

{{/*
Pod-level security context ("restricted" Pod Security Standard).
*/}}
{{- define "dreambooth.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser | int64 }}
runAsGroup: {{ .Values.securityContext.runAsGroup | int64 }}
fsGroup: {{ .Values.securityContext.fsGroup | int64 }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container-level security context ("restricted" Pod Security Standard).
*/}}
{{- define "dreambooth.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser | int64 }}
runAsGroup: {{ .Values.securityContext.runAsGroup | int64 }}
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Shell-quote one value for a POSIX shell: wrap in single quotes, and turn every embedded
single quote into '\'' . (Sprig's `squote` does not escape embedded quotes.)
*/}}
{{- define "dreambooth.shquote" -}}
'{{ replace "'" "'\\''" (toString .) }}'
{{- end }}

{{/*
Render a value as a CLI argument: integral numbers print without an exponent or
decimals (Helm reads YAML numbers as float64, which would print 1000000 as 1e+06).
*/}}
{{- define "dreambooth.argValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
One CLI flag: (list name value). Booleans become --name / --no-name (the job CLI's on/off
flags), except --use-gpu which takes a value (auto|true|false); everything else is
"--name 'value'".
*/}}
{{- define "dreambooth.flag" -}}
{{- $name := index . 0 }}
{{- $value := index . 1 }}
{{- if and (kindIs "bool" $value) (ne $name "use-gpu") }}
{{- printf "--%s%s" (ternary "" "no-" $value) $name }}
{{- else }}
{{- printf "--%s %s" $name (include "dreambooth.shquote" (include "dreambooth.argValue" $value)) }}
{{- end }}
{{- end }}

{{/*
The chart-level run settings (training.*, storage.outputRoot), as a JSON list of
[flag, value] pairs: the per-subject entrypoint turns them into flags, the bulk manifest
into its `defaults`.
*/}}
{{- define "dreambooth.runSettings" -}}
{{- $t := .Values.training }}
{{- $outputRoot := trimSuffix "/" .Values.storage.outputRoot }}
{{- $flags := list (list "model" $t.model) }}
{{- $flags = append $flags (list "prior-output" (default (printf "%s/priors" $outputRoot) $t.priorOutput)) }}
{{- $flags = append $flags (list "num-class-images" $t.numClassImages) }}
{{- $flags = append $flags (list "resolution" $t.resolution) }}
{{- $flags = append $flags (list "max-train-steps" $t.maxTrainSteps) }}
{{- $flags = append $flags (list "mixed-precision" $t.mixedPrecision) }}
{{- $flags = append $flags (list "workers" $t.workers) }}
{{- $flags = append $flags (list "zero-stage" $t.zeroStage) }}
{{- $flags = append $flags (list "use-gpu" (toString $t.useGpu)) }}
{{- range $key, $flag := dict "trainBatchSize" "train-batch-size" "learningRate" "learning-rate" "priorLossWeight" "prior-loss-weight" "checkpointingSteps" "checkpointing-steps" }}
{{- $v := index $t $key }}
{{- if not (kindIs "invalid" $v) }}
{{- $flags = append $flags (list $flag $v) }}
{{- end }}
{{- end }}
{{- toJson $flags }}
{{- end }}

{{/*
The RayJob entrypoint of a subject (layout=perSubject): (list $ $subject).
  python -m ray_jobs.personalize --model M --instance-dir DIR --class-noun NOUN --output OUT ...
Every value is shell-quoted. subject.extraArgs {flag: value} override chart-level flags.
*/}}
{{- define "dreambooth.entrypoint" -}}
{{- $root := index . 0 }}
{{- $s := index . 1 }}
{{- $outputRoot := trimSuffix "/" $root.Values.storage.outputRoot }}
{{- $settings := include "dreambooth.runSettings" $root | fromJsonArray }}
{{- $flags := list
      (index $settings 0)
      (list "instance-dir" $s.instanceDir)
      (list "class-noun" $s.classNoun) }}
{{- if $s.identifier }}
{{- $flags = append $flags (list "identifier" $s.identifier) }}
{{- end }}
{{- $flags = append $flags (list "output" (default (printf "%s/%s" $outputRoot $s.name) $s.output)) }}
{{- $flags = concat $flags (rest $settings) }}
{{- $extra := default (dict) $s.extraArgs }}
{{- $parts := list "python" "-m" "ray_jobs.personalize" }}
{{- range $flags }}
{{- if not (hasKey $extra (index . 0)) }}
{{- $parts = append $parts (include "dreambooth.flag" .) }}
{{- end }}
{{- end }}
{{- range $k := keys $extra | sortAlpha }}
{{- $parts = append $parts (include "dreambooth.flag" (list $k (index $extra $k))) }}
{{- end }}
{{- join " " $parts }}
{{- end }}

{{/*
The `dreambooth bulk` manifest (layout=bulk): {defaults: {...}, subjects: [...]}.
defaults = the chart-level run settings as config keys (use_gpu as text); each subject = name, instance_dir,
class_noun, identifier (if given) and its extraArgs as keys (dashes become underscores;
the reader accepts both). No output: the bulk driver writes <outputRoot>/<name>.
*/}}
{{- define "dreambooth.manifest" -}}
{{- $defaults := dict }}
{{- range (include "dreambooth.runSettings" . | fromJsonArray) }}
{{- $_ := set $defaults (replace "-" "_" (index . 0)) (index . 1) }}
{{- end -}}
# `dreambooth bulk` manifest rendered by the dreambooth chart from values.training and
# values.subjects; change those (helm upgrade), not this ConfigMap.
defaults:
  {{- toYaml $defaults | nindent 2 }}
subjects:
{{- range $s := .Values.subjects }}
{{- $entry := dict "instance_dir" $s.instanceDir "class_noun" $s.classNoun }}
{{- if $s.identifier }}
{{- $_ := set $entry "identifier" $s.identifier }}
{{- end }}
{{- range $k, $v := default (dict) $s.extraArgs }}
{{- $key := replace "-" "_" $k }}
{{- /* use_gpu is a text field (auto/true/false): a YAML boolean would not do */}}
{{- $_ := set $entry $key (ternary (lower (toString $v)) $v (eq $key "use_gpu")) }}
{{- end }}
  - name: {{ $s.name }}
    {{- toYaml $entry | nindent 4 }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the schema cannot express; called from every template that needs them.
*/}}
{{- define "dreambooth.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.jobs.mode "shared") (eq $v.jobs.submissionMode "SidecarMode") }}
{{- fail "jobs.submissionMode=SidecarMode needs jobs.mode=dedicated (KubeRay: clusterSelector is not supported in SidecarMode)" }}
{{- end }}
{{- if and (eq $v.jobs.mode "dedicated") (or $v.dashboard.ingress.enabled (ne $v.dashboard.service.type "ClusterIP")) }}
{{- fail "dashboard.ingress.enabled / dashboard.service.type need jobs.mode=shared: dedicated clusters are created per RayJob and have no stable Service" }}
{{- end }}
{{- if hasKey $v.jobs "backoffLimit" }}
{{- fail "jobs.backoffLimit was removed: set jobs.maxRetries instead (perSubject layout: the RayJob's backoffLimit; bulk layout: the driver's --max-retries)" }}
{{- end }}
{{- $j := $v.jobs }}
{{- $where := printf "jobs.layout=%s with jobs.mode=%s" $j.layout $j.mode }}
{{- if eq $j.layout "bulk" }}
{{- if ne $j.submissionMode "K8sJobMode" }}
{{- fail (printf "jobs.layout=bulk needs jobs.submissionMode=K8sJobMode (got %s): the submitter pod mounts the manifest ConfigMap and uploads it as the job's working_dir; set jobs.submissionMode=K8sJobMode or jobs.layout=perSubject" $j.submissionMode) }}
{{- end }}
{{- range $v.subjects }}
{{- if .output }}
{{- fail (printf "subject %s: output is not allowed with jobs.layout=bulk (the bulk driver writes <storage.outputRoot>/%s); remove it or set jobs.layout=perSubject" .name .name) }}
{{- end }}
{{- end }}
{{- else if eq $j.mode "shared" }}
{{- if lt (int $j.maxConcurrent) 1 }}
{{- fail (printf "%s needs jobs.maxConcurrent >= 1 (got %d): it is how many per-subject drivers the shared head runs at once; set e.g. jobs.maxConcurrent=2" $where (int $j.maxConcurrent)) }}
{{- end }}
{{- if gt (int $j.maxRetries) 0 }}
{{- fail (printf "%s needs jobs.maxRetries=0 (got %d): KubeRay v1.7.0 rejects backoffLimit with clusterSelector; set jobs.maxRetries=0, or use jobs.layout=bulk (retries inside the driver) or jobs.mode=dedicated" $where (int $j.maxRetries)) }}
{{- end }}
{{- end }}
{{- if $v.kueue.queueName }}
{{- if or (ne $j.layout "perSubject") (ne $j.mode "dedicated") }}
{{- fail (printf "kueue.queueName needs jobs.layout=perSubject and jobs.mode=dedicated (got %s): Kueue admits RayJobs that bring their own fixed-size cluster" $where) }}
{{- end }}
{{- end }}
{{- if gt (int $v.worker.minReplicas) (int $v.worker.maxReplicas) }}
{{- fail "worker.minReplicas must not exceed worker.maxReplicas" }}
{{- end }}
{{- if gt (int $v.training.workers) (mul (int $v.worker.maxReplicas) (int $v.worker.resources.gpu)) }}
{{- fail (printf "training.workers=%d needs %d GPUs (1 per worker) but the worker group has at most worker.maxReplicas x worker.resources.gpu = %d" (int $v.training.workers) (int $v.training.workers) (mul (int $v.worker.maxReplicas) (int $v.worker.resources.gpu))) }}
{{- end }}
{{- range $g := list "head" "worker" }}
{{- range (index $v $g).volumes }}
{{- if has .name (list "shared" "dshm") }}
{{- fail (printf "%s.volumes: the name %q is the chart's own (shared storage, /dev/shm); pick another" $g .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- range $v.subjects }}
{{- $job := include "dreambooth.jobName" (list $ .) }}
{{- if hasKey $seen $job }}
{{- fail (printf "subjects: two subjects map to the same RayJob name %q (subject names must be unique)" $job) }}
{{- end }}
{{- $_ := set $seen $job true }}
{{- $extra := default (dict) .extraArgs }}
{{- if and (hasKey $extra "workers") (gt (int (index $extra "workers")) (mul (int $v.worker.maxReplicas) (int $v.worker.resources.gpu))) }}
{{- fail (printf "subject %s: extraArgs.workers exceeds worker.maxReplicas x worker.resources.gpu" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
layout=bulk names: the RayJob, the manifest ConfigMap (rendered by the chart) and the summary
ConfigMap (written by the in-cluster driver as subjects finish; never rendered here).
*/}}
{{- define "dreambooth.bulkJobName" -}}
{{- printf "%s-bulk" (include "dreambooth.fullname" .) }}
{{- end }}

{{- define "dreambooth.manifestName" -}}
{{- printf "%s-manifest" (include "dreambooth.fullname" .) }}
{{- end }}

{{- define "dreambooth.bulkSummaryName" -}}
{{- printf "%s-bulk-summary" (include "dreambooth.fullname" .) }}
{{- end }}

{{- define "dreambooth.manifestMountPath" -}}
/dreambooth/manifest
{{- end }}

{{/*
Where a RayJob runs: (dict "root" $ "fixedReplicas" N). jobs.mode=shared: the release's
RayCluster (clusterSelector); dedicated: a cluster of its own (rayClusterSpec), fixed-size
and always shut down when fixedReplicas > 0 (Kueue).
*/}}
{{- define "dreambooth.rayJobCluster" -}}
{{- $root := .root }}
{{- $fixed := int (default 0 .fixedReplicas) }}
{{- $jobs := $root.Values.jobs }}
{{- if eq $jobs.mode "shared" }}
# Run on the release's long-lived RayCluster. shutdownAfterJobFinishes and
# ttlSecondsAfterFinished only apply to clusters a RayJob creates, so they are not set.
clusterSelector:
  ray.io/cluster: {{ include "dreambooth.clusterName" $root }}
{{- else }}
# A dedicated cluster for this job, created by KubeRay and named after the RayJob.
{{- $shutdown := or $jobs.shutdownAfterJobFinishes (gt $fixed 0) }}
shutdownAfterJobFinishes: {{ $shutdown }}
{{- if $shutdown }}
ttlSecondsAfterFinished: {{ $jobs.ttlSecondsAfterFinished | int64 }}
{{- end }}
rayClusterSpec:
  {{- include "dreambooth.rayClusterSpec" (dict "root" $root "fixedReplicas" $fixed) | trim | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The K8sJobMode submitter pod: (dict "root" $ "manifest" bool). First container = submitter;
KubeRay fills in the `ray job submit` command, the dashboard address and the auth token.
With manifest: the bulk manifest ConfigMap mounted read-only at the job's working_dir.
*/}}
{{- define "dreambooth.submitterPodTemplate" -}}
{{- $root := .root }}
{{- $jobs := $root.Values.jobs }}
submitterPodTemplate:
  metadata:
    labels:
      {{- include "dreambooth.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: ray-job-submitter
  spec:
    restartPolicy: Never
    automountServiceAccountToken: false
    {{- with $root.Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- include "dreambooth.podSecurityContext" $root | nindent 6 }}
    containers:
      - name: ray-job-submitter
        image: {{ include "dreambooth.image" $root }}
        imagePullPolicy: {{ $root.Values.image.pullPolicy }}
        resources:
          requests:
            cpu: {{ $jobs.submitter.resources.cpu | quote }}
            memory: {{ $jobs.submitter.resources.memory | quote }}
          limits:
            cpu: {{ $jobs.submitter.resources.cpu | quote }}
            memory: {{ $jobs.submitter.resources.memory | quote }}
        securityContext:
          {{- include "dreambooth.containerSecurityContext" $root | nindent 10 }}
        {{- if .manifest }}
        volumeMounts:
          - name: manifest
            mountPath: {{ include "dreambooth.manifestMountPath" $root }}
            readOnly: true
        {{- end }}
    {{- if .manifest }}
    volumes:
      - name: manifest
        configMap:
          name: {{ include "dreambooth.manifestName" $root }}
          items:
            - key: manifest.yaml
              path: manifest.yaml
    {{- end }}
{{- end }}
