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
The RayJob entrypoint of a subject: (list $ $subject).
  python -m ray_jobs.personalize --model M --instance-dir DIR --class-noun NOUN --output OUT ...
Every value is shell-quoted. subject.extraArgs {flag: value} override chart-level flags.
*/}}
{{- define "dreambooth.entrypoint" -}}
{{- $root := index . 0 }}
{{- $s := index . 1 }}
{{- $t := $root.Values.training }}
{{- $outputRoot := trimSuffix "/" $root.Values.storage.outputRoot }}
{{- $flags := list
      (list "model" $t.model)
      (list "instance-dir" $s.instanceDir)
      (list "class-noun" $s.classNoun) }}
{{- if $s.identifier }}
{{- $flags = append $flags (list "identifier" $s.identifier) }}
{{- end }}
{{- $flags = append $flags (list "output" (default (printf "%s/%s" $outputRoot $s.name) $s.output)) }}
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
{{- if and (eq $v.jobs.mode "shared") (gt (int $v.jobs.backoffLimit) 0) }}
{{- fail "jobs.backoffLimit must be 0 with jobs.mode=shared (KubeRay v1.7.0: BackoffLimit is incompatible with ClusterSelector mode)" }}
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
