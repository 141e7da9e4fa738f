{{/*
Environment shared by every Ray container (head and workers).
*/}}
{{- define "dreambooth.rayEnv" -}}
{{- if eq .Values.storage.type "pvc" }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (trimSuffix "/" .Values.storage.pvc.mountPath) | quote }}
{{- else }}
{{- with .Values.storage.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- range $name := keys .Values.env | sortAlpha }}
- name: {{ $name }}
  value: {{ index $.Values.env $name | quote }}
{{- end }}
{{- end }}

{{/*
Storage wiring of a Ray container: volumeMounts / envFrom.
*/}}
{{- define "dreambooth.storageMounts" -}}
{{- if eq .Values.storage.type "pvc" }}
- name: shared
  mountPath: {{ .Values.storage.pvc.mountPath }}
{{- end }}
{{- end }}

{{/*
envFrom of a Ray container: (list $ $group) with $group = .Values.head or .Values.worker.
Object-store credentials come only from an existing Secret (never from values); without one
(storage.s3.existingSecret empty) the pods use workload identity and no Secret is referenced.
*/}}
{{- define "dreambooth.envFrom" -}}
{{- $root := index . 0 }}
{{- $group := index . 1 }}
{{- $sources := list }}
{{- if and (eq $root.Values.storage.type "s3") $root.Values.storage.s3.existingSecret }}
{{- $sources = append $sources (dict "secretRef" (dict "name" $root.Values.storage.s3.existingSecret)) }}
{{- end }}
{{- $sources = concat $sources $group.envFrom }}
{{- with $sources }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod template metadata of a Ray group: (list $ $group $component). The group's extra labels
come first so the chart's selector/component labels win.
*/}}
{{- define "dreambooth.rayPodMetadata" -}}
{{- $root := index . 0 }}
{{- $group := index . 1 }}
{{- $component := index . 2 }}
{{- $labels := merge (dict "app.kubernetes.io/component" $component) (include "dreambooth.selectorLabels" $root | fromYaml) (deepCopy $group.labels) }}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with $group.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod-level scheduling/identity fields of a Ray group: (list $ $group).
*/}}
{{- define "dreambooth.rayPodScheduling" -}}
{{- $root := index . 0 }}
{{- $group := index . 1 }}
serviceAccountName: {{ default (include "dreambooth.serviceAccountName" $root) $group.serviceAccountName }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "dreambooth.podSecurityContext" $root | nindent 2 }}
{{- with $group.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "dreambooth.storageVolumes" -}}
{{- if eq .Values.storage.type "pvc" }}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "dreambooth.pvcName" . }}
{{- end }}
{{- end }}

{{/*
The RayCluster spec, shared by the standalone RayCluster (jobs.mode=shared) and by each
RayJob's spec.rayClusterSpec (jobs.mode=dedicated). Called with a dict:
  root:          the chart's top-level context ($)
  driverSlots:   > 0: the head advertises that many "dreambooth-driver" custom resources
                 (layout=perSubject, shared: each RayJob's entrypointResources takes one)
  fixedReplicas: > 0: a fixed-size worker group of that many pods and no in-tree
                 autoscaling (Kueue reserves the whole cluster up front)
*/}}
{{- define "dreambooth.rayClusterSpec" -}}
{{- $opts := . }}
{{- $driverSlots := int (default 0 $opts.driverSlots) }}
{{- $fixed := int (default 0 $opts.fixedReplicas) }}
{{- with $opts.root }}
{{- $image := include "dreambooth.image" . -}}
rayVersion: {{ .Values.rayVersion | quote }}
# Ray token authentication: KubeRay injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (key
# `auth_token` of auth.existingSecret, or of the Secret the operator generates, named after
# the RayCluster) into the head, the workers, the autoscaler and the submitter.
authOptions:
  mode: token
  {{- with .Values.auth.existingSecret }}
  secretName: {{ . }}
  {{- end }}
{{- if gt $fixed 0 }}
# Fixed size (Kueue admits and reserves the whole cluster): no autoscaler sidecar.
enableInTreeAutoscaling: false
{{- else }}
enableInTreeAutoscaling: true
autoscalerOptions:
  idleTimeoutSeconds: {{ .Values.autoscaler.idleTimeoutSeconds | int64 }}
  upscalingMode: {{ .Values.autoscaler.upscalingMode }}
  version: {{ .Values.autoscaler.version }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  resources:
    requests:
      cpu: {{ .Values.autoscaler.resources.cpu | quote }}
      memory: {{ .Values.autoscaler.resources.memory | quote }}
    limits:
      cpu: {{ .Values.autoscaler.resources.cpu | quote }}
      memory: {{ .Values.autoscaler.resources.memory | quote }}
  securityContext:
    {{- include "dreambooth.containerSecurityContext" . | nindent 4 }}
{{- end }}
headGroupSpec:
  # The dashboard/job API stays inside the cluster; see dashboard.* to expose it.
  serviceType: ClusterIP
  rayStartParams:
    num-cpus: {{ .Values.head.rayCpus | int64 | quote }}
    {{- if gt $driverSlots 0 }}
    # Driver slots: each per-subject RayJob asks for one (entrypointResources), so at most
    # jobs.maxConcurrent drivers run on this head; the others wait in PENDING. Single-quoted
    # JSON, the form the KubeRay v1.7.0 operator parses (and writes) itself; the shell that
    # runs `ray start` removes the quotes.
    resources: {{ printf "'{\"dreambooth-driver\": %d}'" $driverSlots | quote }}
    {{- end }}
  template:
    metadata:
      {{- include "dreambooth.rayPodMetadata" (list . .Values.head "ray-head") | trim | nindent 6 }}
    spec:
      # The autoscaler sidecar patches the RayCluster through the Kubernetes API with this
      # ServiceAccount's token (the KubeRay operator binds its autoscaler Role to it).
      automountServiceAccountToken: true
      {{- include "dreambooth.rayPodScheduling" (list . .Values.head) | trim | nindent 6 }}
      containers:
        - name: ray-head
          image: {{ $image }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - name: gcs
              containerPort: 6379
            - name: dashboard
              containerPort: 8265
            - name: client
              containerPort: 10001
          resources:
            requests:
              cpu: {{ .Values.head.resources.cpu | quote }}
              memory: {{ .Values.head.resources.memory | quote }}
            limits:
              cpu: {{ .Values.head.resources.cpu | quote }}
              memory: {{ .Values.head.resources.memory | quote }}
          securityContext:
            {{- include "dreambooth.containerSecurityContext" . | nindent 12 }}
          {{- $headEnv := include "dreambooth.rayEnv" . | trim }}
          {{- if and (gt $driverSlots 0) (not (hasKey .Values.env "RAY_JOB_START_TIMEOUT_SECONDS")) }}
          {{- /* Ray fails a job whose driver has not started within RAY_JOB_START_TIMEOUT_SECONDS
                 (900 s by default): queued per-subject drivers wait for a free slot far longer,
                 so the head allows 7 days (env.RAY_JOB_START_TIMEOUT_SECONDS overrides it). */}}
          {{- $headEnv = printf "%s\n- name: RAY_JOB_START_TIMEOUT_SECONDS\n  value: %s" $headEnv (quote "604800") | trim }}
          {{- end }}
          {{- with $headEnv }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          {{- with include "dreambooth.envFrom" (list . .Values.head) }}
          {{- . | trim | nindent 10 }}
          {{- end }}
          {{- $headMounts := include "dreambooth.storageMounts" . | trim }}
          {{- if or $headMounts .Values.head.volumeMounts }}
          volumeMounts:
            {{- with $headMounts }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with .Values.head.volumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- end }}
      {{- $headVolumes := include "dreambooth.storageVolumes" . | trim }}
      {{- if or $headVolumes .Values.head.volumes }}
      volumes:
        {{- with $headVolumes }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with .Values.head.volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
workerGroupSpecs:
  - groupName: {{ .Values.worker.groupName }}
    {{- if gt $fixed 0 }}
    # Fixed size: the GPU pods this job's training workers need (1 GPU per worker).
    replicas: {{ $fixed }}
    minReplicas: {{ $fixed }}
    maxReplicas: {{ $fixed }}
    {{- else }}
    # Autoscaled from minReplicas (0: no GPU pods while idle) up to maxReplicas.
    replicas: {{ .Values.worker.minReplicas | int64 }}
    minReplicas: {{ .Values.worker.minReplicas | int64 }}
    maxReplicas: {{ .Values.worker.maxReplicas | int64 }}
    {{- end }}
    # What each pod advertises to Ray; every training worker / prior actor asks for 1 GPU.
    rayStartParams:
      num-cpus: {{ .Values.worker.resources.cpu | int64 | quote }}
      num-gpus: {{ .Values.worker.resources.gpu | int64 | quote }}
    template:
      metadata:
        {{- include "dreambooth.rayPodMetadata" (list . .Values.worker "ray-worker") | trim | nindent 8 }}
      spec:
        # Workers never talk to the Kubernetes API (cloud workload identity does not need
        # this token: IRSA / EKS Pod Identity project their own, GKE uses the metadata server).
        automountServiceAccountToken: false
        {{- include "dreambooth.rayPodScheduling" (list . .Values.worker) | trim | nindent 8 }}
        containers:
          - name: ray-worker
            image: {{ $image }}
            imagePullPolicy: {{ .Values.image.pullPolicy }}
            resources:
              requests:
                cpu: {{ .Values.worker.resources.cpu | int64 | quote }}
                memory: {{ .Values.worker.resources.memory | quote }}
                {{ .Values.worker.gpuResourceName }}: {{ .Values.worker.resources.gpu | int64 | quote }}
              limits:
                cpu: {{ .Values.worker.resources.cpu | int64 | quote }}
                memory: {{ .Values.worker.resources.memory | quote }}
                {{ .Values.worker.gpuResourceName }}: {{ .Values.worker.resources.gpu | int64 | quote }}
            securityContext:
              {{- include "dreambooth.containerSecurityContext" . | nindent 14 }}
            {{- with include "dreambooth.rayEnv" . }}
            env:
              {{- . | trim | nindent 14 }}
            {{- end }}
            {{- with include "dreambooth.envFrom" (list . .Values.worker) }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            volumeMounts:
              - name: dshm
                mountPath: /dev/shm
              {{- with include "dreambooth.storageMounts" . }}
              {{- . | trim | nindent 14 }}
              {{- end }}
              {{- with .Values.worker.volumeMounts }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
        volumes:
          - name: dshm
            emptyDir:
              medium: Memory
              sizeLimit: {{ .Values.worker.shmSize }}
          {{- with include "dreambooth.storageVolumes" . }}
          {{- . | trim | nindent 10 }}
          {{- end }}
          {{- with .Values.worker.volumes }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
{{- end }}
{{- end }}
