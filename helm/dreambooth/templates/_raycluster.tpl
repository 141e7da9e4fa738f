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

{{- define "dreambooth.storageEnvFrom" -}}
{{- if eq .Values.storage.type "s3" }}
envFrom:
  # Object-store credentials come only from this existing Secret, never from values.
  - secretRef:
      name: {{ .Values.storage.s3.existingSecret }}
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
RayJob's spec.rayClusterSpec (jobs.mode=dedicated).
*/}}
{{- define "dreambooth.rayClusterSpec" -}}
{{- $image := include "dreambooth.image" . -}}
rayVersion: {{ .Values.rayVersion | quote }}
# Ray token authentication: KubeRay injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from
# this Secret's `auth_token` key) into the head, the workers, the autoscaler and the submitter.
authOptions:
  mode: token
  secretName: {{ include "dreambooth.authSecretName" . }}
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
headGroupSpec:
  # The dashboard/job API stays inside the cluster; see dashboard.* to expose it.
  serviceType: ClusterIP
  rayStartParams:
    num-cpus: {{ .Values.head.rayCpus | int64 | quote }}
  template:
    metadata:
      labels:
        {{- include "dreambooth.selectorLabels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "dreambooth.podSecurityContext" . | nindent 8 }}
      {{- with .Values.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
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
          {{- with include "dreambooth.rayEnv" . }}
          env:
            {{- . | trim | nindent 12 }}
          {{- end }}
          {{- with include "dreambooth.storageEnvFrom" . }}
          {{- . | trim | nindent 10 }}
          {{- end }}
          {{- with include "dreambooth.storageMounts" . }}
          volumeMounts:
            {{- . | trim | nindent 12 }}
          {{- end }}
      {{- with include "dreambooth.storageVolumes" . }}
      volumes:
        {{- . | trim | nindent 8 }}
      {{- end }}
workerGroupSpecs:
  - groupName: {{ .Values.worker.groupName }}
    # Autoscaled from minReplicas (0: no GPU pods while idle) up to maxReplicas.
    replicas: {{ .Values.worker.minReplicas | int64 }}
    minReplicas: {{ .Values.worker.minReplicas | int64 }}
    maxReplicas: {{ .Values.worker.maxReplicas | int64 }}
    # What each pod advertises to Ray; every training worker / prior actor asks for 1 GPU.
    rayStartParams:
      num-cpus: {{ .Values.worker.resources.cpu | int64 | quote }}
      num-gpus: {{ .Values.worker.resources.gpu | int64 | quote }}
    template:
      metadata:
        labels:
          {{- include "dreambooth.selectorLabels" . | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      spec:
        # Workers never talk to the Kubernetes API.
        automountServiceAccountToken: false
        {{- with .Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        securityContext:
          {{- include "dreambooth.podSecurityContext" . | nindent 10 }}
        {{- with .Values.worker.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .Values.worker.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
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
            {{- with include "dreambooth.storageEnvFrom" . }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            volumeMounts:
              - name: dshm
                mountPath: /dev/shm
              {{- with include "dreambooth.storageMounts" . }}
              {{- . | trim | nindent 14 }}
              {{- end }}
        volumes:
          - name: dshm
            emptyDir:
              medium: Memory
              sizeLimit: {{ .Values.worker.shmSize }}
          {{- with include "dreambooth.storageVolumes" . }}
          {{- . | trim | nindent 10 }}
          {{- end }}
{{- end }}
