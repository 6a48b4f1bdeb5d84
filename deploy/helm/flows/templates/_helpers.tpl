{{/*
Chart name, or nameOverride.
*/}}
{{- define "flows.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every object name: fullnameOverride, else the release name when it already
contains the chart name, else "<release>-<name>". Kept to 40 characters so that
"<fullname>-clickhouse-headless" and the like stay within 63.
*/}}
{{- define "flows.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "flows.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Names of the components' objects. Call with (dict "ctx" $ "component" "relay").
*/}}
{{- define "flows.componentName" -}}
{{- printf "%s-%s" (include "flows.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels of a component: only labels that never change over the life of a
release. app.kubernetes.io/name is "<name>-<component>", e.g. flows-node-probe, which
is what the relay's --discover-selector looks for.
*/}}
{{- define "flows.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "flows.name" .ctx) .component | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- end -}}

{{/*
Every label of a component's objects.
*/}}
{{- define "flows.labels" -}}
{{ include "flows.selectorLabels" . }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: flows
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
helm.sh/chart: {{ include "flows.chart" .ctx }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Labels of objects that belong to no single component (the Namespace).
*/}}
{{- define "flows.commonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: flows
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
helm.sh/chart: {{ include "flows.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The flows image (node-probe and relay).
*/}}
{{- define "flows.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The relay's --discover-selector: the node-probe pods of this release.
*/}}
{{- define "flows.probeSelector" -}}
{{- $labels := include "flows.selectorLabels" (dict "ctx" . "component" "node-probe") | fromYaml -}}
{{- $parts := list -}}
{{- range $k, $v := $labels -}}
{{- $parts = append $parts (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}

{{/*
The store is an in-chart ClickHouse.
*/}}
{{- define "flows.clickhouseEnabled" -}}
{{- if and .Values.store.enabled .Values.clickhouse.enabled -}}true{{- end -}}
{{- end -}}

{{/*
The URL the relay writes to.
*/}}
{{- define "flows.storeURL" -}}
{{- if .Values.clickhouse.enabled -}}
{{- printf "http://%s.%s.svc:8123" (include "flows.componentName" (dict "ctx" . "component" "clickhouse")) .Release.Namespace -}}
{{- else -}}
{{- required "store.url is required when store.enabled=true and clickhouse.enabled=false" .Values.store.url -}}
{{- end -}}
{{- end -}}

{{/*
Port of an external store.url: the one it names, else the scheme's.
*/}}
{{- define "flows.externalStorePort" -}}
{{- $u := urlParse .Values.store.url -}}
{{- $port := regexFind ":[0-9]+$" $u.host | trimPrefix ":" -}}
{{- if $port -}}
{{- $port -}}
{{- else if eq $u.scheme "https" -}}
443
{{- else -}}
80
{{- end -}}
{{- end -}}

{{/*
Secret and key holding the store password, as "name key"; empty when there is none.
*/}}
{{- define "flows.storeSecretName" -}}
{{- if .Values.clickhouse.enabled -}}
{{- default (printf "%s-auth" (include "flows.componentName" (dict "ctx" . "component" "clickhouse"))) .Values.clickhouse.auth.existingSecret -}}
{{- else -}}
{{- .Values.store.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "flows.storeSecretKey" -}}
{{- if .Values.clickhouse.enabled -}}
{{- .Values.clickhouse.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- .Values.store.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{- define "flows.storeUser" -}}
{{- if .Values.clickhouse.enabled -}}
{{- .Values.clickhouse.auth.username -}}
{{- else -}}
{{- .Values.store.user -}}
{{- end -}}
{{- end -}}

{{/*
ClickHouse configuration added to the image's: logs to stderr only.
*/}}
{{- define "flows.clickhouseConfig" -}}
<clickhouse>
  <logger>
    <level>information</level>
    <console>1</console>
    <log remove="remove"/>
    <errorlog remove="remove"/>
  </logger>
</clickhouse>
{{- end -}}
