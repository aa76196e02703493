-- Argo CD health check for matrix.openmeet.net's four kinds, one script
-- under each argocd-cm key: resource.customizations.health.
-- matrix.openmeet.net_MatrixUser, _MatrixRoom, _RoomPermission and
-- _MatrixUserGrant.
-- Reads the kstatus conditions the operator writes, as kstatus does:
-- a status about an older generation is Progressing, Stalled=True is
-- Degraded, Ready=True is Healthy, anything else is Progressing.
local health = { status = "Progressing", message = "Waiting for the operator to observe this " .. obj.kind }
local status = obj.status
if status == nil or status.observedGeneration == nil or obj.metadata.generation == nil
    or status.observedGeneration ~= obj.metadata.generation then
  return health
end
local found = {}
for _, condition in ipairs(status.conditions or {}) do
  found[condition.type] = condition
end
local function describe(condition)
  local message = condition.reason or ""
  if condition.message ~= nil and condition.message ~= "" then
    message = message .. ": " .. condition.message
  end
  return message
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  health.status = "Degraded"
  health.message = describe(found.Stalled)
elseif found.Ready ~= nil and found.Ready.status == "True" then
  health.status = "Healthy"
  health.message = describe(found.Ready)
elseif found.Ready ~= nil then
  health.message = describe(found.Ready)
end
return health
