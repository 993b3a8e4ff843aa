"""The Lua scripts of the Redis backend: each is one atomic step on the server.

The store's scripts come first, then the broker's; committing a node is shared by both
(``COMMIT_NODE_BODY``), so that the broker can commit a record and complete its task in
one script.
"""

from __future__ import annotations

from typing import Final

# KEYS: run hash, runs zset.  ARGV: run id, created_at, field/value pairs.
CREATE_RUN: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return false
"""

# KEYS: run hash.  ARGV: n, n field/value pairs to set, then fields to delete.
UPDATE_RUN: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + 2 * n))
if #ARGV > 1 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 2 + 2 * n)) end
return 1
"""

# A node's commit, first one wins.  KEYS: nodes hash, blob key, blobrefs.
# ARGV: node id, record, digest ('' for an inline value), blob.  Shared with the broker's
# commit-and-complete, which appends its own steps after it.
COMMIT_NODE_BODY: Final = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return redis.call('HGET', KEYS[1], ARGV[1])
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'NX')
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
"""
COMMIT_NODE: Final = COMMIT_NODE_BODY + "return 1\n"

# Drop a use of a blob; the blob goes with its last use.
_UNREF: Final = """
local function blob_of(record)
  if not record then return nil end
  return string.match(record, '^{"blob":"(%x+)"')
end
local function unref(prefix, refs, digest)
  if not digest then return end
  if redis.call('HINCRBY', refs, digest, -1) <= 0 then
    redis.call('HDEL', refs, digest)
    redis.call('DEL', prefix .. ':blob:' .. digest)
  end
end
"""

# KEYS: nodes hash, blobrefs.  ARGV: prefix, node ids.
FORGET_NODES: Final = (
    _UNREF
    + """
for i = 2, #ARGV do
  local record = redis.call('HGET', KEYS[1], ARGV[i])
  if record then
    redis.call('HDEL', KEYS[1], ARGV[i])
    unref(ARGV[1], KEYS[2], blob_of(record))
  end
end
return 1
"""
)

# Deleting an ended run and its journal, when it is still ended and was last updated
# before a time.  KEYS: run hash, nodes hash, runs zset, blobrefs.  ARGV: prefix, run id,
# cutoff, then the statuses that may go.  Returns 1 when the run was deleted.
PRUNE_RUN: Final = (
    _UNREF
    + """
local status = redis.call('HGET', KEYS[1], 'status')
local updated = tonumber(redis.call('HGET', KEYS[1], 'updated_at') or '')
if not status then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  redis.call('ZREM', KEYS[3], ARGV[2])
  return 0
end
if not updated or updated >= tonumber(ARGV[3]) then return 0 end
local allowed = false
for i = 4, #ARGV do
  if ARGV[i] == status then allowed = true end
end
if not allowed then return 0 end
local nodes = redis.call('HGETALL', KEYS[2])
for i = 2, #nodes, 2 do unref(ARGV[1], KEYS[4], blob_of(nodes[i])) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""
)

# KEYS: cache hash, blob key, blobrefs.  ARGV: prefix, cache key, entry, digest, blob.
PUT_CACHED: Final = (
    _UNREF
    + """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[5], 'NX')
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
unref(ARGV[1], KEYS[3], blob_of(old))
return 1
"""
)

# The run lease: a key holding the owner, expiring on the server's clock (PX), so hosts
# whose clocks differ agree on when it ran out.
# KEYS: lease.  ARGV: owner, ttl ms, the holder known dead ('' for none).  Returns nil
# when taken, else {holder, ms left}.
ACQUIRE_LEASE: Final = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] or (ARGV[3] ~= '' and holder == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return {holder, redis.call('PTTL', KEYS[1])}
"""

# KEYS: leases.  ARGV: owner, ttl ms.  Returns the (1-based) indexes of the leases lost.
RENEW_LEASES: Final = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

# KEYS: lease.  ARGV: owner.
RELEASE_LEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# --- the broker's ------------------------------------------------------------------------

# KEYS: tasks, queued.  ARGV: (queued field, run id, node id, payload) quadruples.  A
# node already queued or held is not added twice; an index entry whose task is gone
# (deleted by hand) is stale.  The entry names its run and node beside the payload, so
# that a payload too broken to read still fails its own run.
ENQUEUE: Final = """
for i = 1, #ARGV, 4 do
  local id = redis.call('HGET', KEYS[2], ARGV[i])
  if not id or #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    id = redis.call('XADD', KEYS[1], '*', 'run', ARGV[i + 1], 'node', ARGV[i + 2],
                    'key', ARGV[i], 'payload', ARGV[i + 3])
    redis.call('HSET', KEYS[2], ARGV[i], id)
  end
end
return 1
"""

# Reclaiming tasks whose leases ran out, then reading new ones up to the count.
# KEYS: tasks.  ARGV: group, consumer, count, min idle ms ('' to skip reclaiming),
# reclaim cursor.  Returns {next cursor, {{id, deliveries, fields}, ...}}.
CLAIM: Final = """
local out = {}
local n = tonumber(ARGV[3])
local cursor = ARGV[5]
if ARGV[4] ~= '' then
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], cursor, 'COUNT', n)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    if e[2] then
      local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
      local count = 1
      if p[1] then count = p[1][4] end
      out[#out + 1] = {e[1], count, e[2]}
    end
  end
  n = n - #out
end
if n > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', n,
                       'STREAMS', KEYS[1], '>')
  if r then
    for _, e in ipairs(r[1][2]) do out[#out + 1] = {e[1], 1, e[2]} end
  end
end
return {cursor, out}
"""

# KEYS: tasks.  ARGV: group, consumer, ids.  Only entries this consumer still owns.
EXTEND: Final = """
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return 1
"""

# Removing a task and publishing its completion.  Expects KEYS[t] tasks, KEYS[q] queued,
# KEYS[c] completions and ARGV[g] group, ARGV[i] task id, ARGV[f] queued field,
# ARGV[p] payload, ARGV[k] keep, bound by the scripts that include it.
FINISH: Final = """
local function finish(tasks, queued, completions, group, id, field, payload, keep)
  redis.call('XACK', tasks, group, id)
  redis.call('XDEL', tasks, id)
  if redis.call('HGET', queued, field) == id then redis.call('HDEL', queued, field) end
  redis.call('XADD', completions, 'MAXLEN', '~', keep, '*', 'payload', payload)
end
local function publish(events, keep, first)
  for j = first, #ARGV, 2 do
    redis.call('XADD', events, 'MAXLEN', '~', keep, '*', 'run', ARGV[j], 'payload', ARGV[j + 1])
  end
end
"""

# The scripts below take the node's events as (run id, event) pairs at the end of ARGV and
# publish them with the completion, after the commit: a StepFinished is never seen for a
# node that is not in the journal, and never after the completion that may end its run.

# KEYS: nodes hash, blob, blobrefs, tasks, queued, completions, events.  ARGV: node id,
# record, digest, blob, group, task id, queued field, payload, keep, events.  Returns 1
# when committed and completed, else the record committed first (and changes nothing).
COMMIT_AND_COMPLETE: Final = (
    FINISH
    + COMMIT_NODE_BODY
    + """
publish(KEYS[7], ARGV[9], 10)
finish(KEYS[4], KEYS[5], KEYS[6], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
return 1
"""
)

# Going through a run's tasks, a chunk at a time, for drop_queued and redeliver.
# KEYS: tasks, queued.  ARGV: group, run id, start (inclusive or "(exclusive"), count,
# what to do ("drop": delete the tasks not yet handed out; "redeliver": put the handed-out
# ones back as new entries, delivery counts starting afresh), n, then n node ids whose
# tasks "redeliver" deletes instead (committed nodes), then the names of live workers,
# whose tasks "redeliver" leaves to them.  Returns {scanned, last id}.
RUN_TASKS: Final = """
local skip, live = {}, {}
local n = tonumber(ARGV[6] or '0')
for i = 7, 6 + n do skip[ARGV[i]] = true end
for i = 7 + n, #ARGV do live[ARGV[i]] = true end
local function held_by_live(id)
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  return p[1] ~= nil and live[p[1][2]] == true
end
local function id_of(text)
  local ms, seq = string.match(text, '^(%d+)-(%d+)$')
  return {tonumber(ms or 0), tonumber(seq or 0)}
end
local function after(a, b)
  return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2])
end
local last = {0, 0}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  for j = 1, #g, 2 do
    if g[j] == 'name' and g[j + 1] == ARGV[1] then
      for k = 1, #g, 2 do
        if g[k] == 'last-delivered-id' then last = id_of(g[k + 1]) end
      end
    end
  end
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[3], '+', 'COUNT', ARGV[4])
for _, e in ipairs(entries) do
  local fields, run, node, key = e[2], nil, nil, nil
  for j = 1, #fields, 2 do
    if fields[j] == 'run' then run = fields[j + 1] end
    if fields[j] == 'node' then node = fields[j + 1] end
    if fields[j] == 'key' then key = fields[j + 1] end
  end
  if run == ARGV[2] then
    local handed_out = not after(id_of(e[1]), last)
    if ARGV[5] == 'redeliver' and node and skip[node] then
      redis.call('XACK', KEYS[1], ARGV[1], e[1])
      redis.call('XDEL', KEYS[1], e[1])
      if key and redis.call('HGET', KEYS[2], key) == e[1] then
        redis.call('HDEL', KEYS[2], key)
      end
    elseif ARGV[5] == 'drop' and not handed_out then
      redis.call('XDEL', KEYS[1], e[1])
      if key and redis.call('HGET', KEYS[2], key) == e[1] then
        redis.call('HDEL', KEYS[2], key)
      end
    elseif ARGV[5] == 'redeliver' and handed_out and not held_by_live(e[1]) then
      redis.call('XACK', KEYS[1], ARGV[1], e[1])
      redis.call('XDEL', KEYS[1], e[1])
      local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
      if key and redis.call('HGET', KEYS[2], key) == e[1] then
        redis.call('HSET', KEYS[2], key, id)
      end
    end
  end
end
local tail = ''
if #entries > 0 then tail = entries[#entries][1] end
return {#entries, tail}
"""

# Tasks finished (one, or a worker's batch), each completed, dead-lettered, or committed
# and completed as COMMIT_AND_COMPLETE does, in one script: one round trip for the lot.  A
# task no longer pending (another worker completed it, or this is a retry after a lost
# reply) has had its completion published already: it is only deleted.
# KEYS: tasks, queued, completions, events, dead, blobrefs, then for each commit its nodes
# hash (and for 'k' its blob key).  ARGV: group, keep, time, then per task: what ('c'
# complete, 'd' dead-letter, 'k' commit and complete, 'j' the same for a value kept
# inline), task id, queued field, payload, n, n (run id, event) pairs, then for 'k': node
# id, record, digest, blob; for 'j': node id, record; for 'd': run id, node id, reason.
# Returns one result per task: 1 when finished; 0 for a task no longer pending (finished
# before); for 'k' and 'j', the record committed first when there was one (and nothing
# changes for that task).
FINISH_MANY: Final = """
local tasks, queued, completions, events, dead, refs =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group, keep, now = ARGV[1], ARGV[2], ARGV[3]
local function publish(first, n)
  for j = first, first + 2 * n - 1, 2 do
    redis.call('XADD', events, 'MAXLEN', '~', keep, '*', 'run', ARGV[j], 'payload', ARGV[j + 1])
  end
end
local function finish(id, field, payload)
  redis.call('XACK', tasks, group, id)
  redis.call('XDEL', tasks, id)
  if redis.call('HGET', queued, field) == id then redis.call('HDEL', queued, field) end
  redis.call('XADD', completions, 'MAXLEN', '~', keep, '*', 'payload', payload)
end
local out = {}
local k, i = 7, 4
while i <= #ARGV do
  local what, id, field, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local n = tonumber(ARGV[i + 4])
  local first = i + 5
  i = first + 2 * n
  local result = 1
  if what == 'k' or what == 'j' then
    local nodes, node, record = KEYS[k], ARGV[i], ARGV[i + 1]
    local blob, digest, data = nil, '', nil
    if what == 'k' then
      blob, digest, data = KEYS[k + 1], ARGV[i + 2], ARGV[i + 3]
      k, i = k + 2, i + 4
    else
      k, i = k + 1, i + 2
    end
    if redis.call('HSETNX', nodes, node, record) == 0 then
      result = redis.call('HGET', nodes, node)
    else
      if digest ~= '' then
        redis.call('SET', blob, data, 'NX')
        redis.call('HINCRBY', refs, digest, 1)
      end
      publish(first, n)
      finish(id, field, payload)
    end
  elseif what == 'd' then
    local run, node, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    local entry = redis.call('XRANGE', tasks, id, id)
    if redis.call('XACK', tasks, group, id) == 0 then
      redis.call('XDEL', tasks, id)
      result = 0
    else
      local task = ''
      if entry[1] then
        local fields = entry[1][2]
        for j = 1, #fields, 2 do
          if fields[j] == 'payload' then task = fields[j + 1] end
        end
      end
      redis.call('XADD', dead, 'MAXLEN', '~', keep, '*', 'run', run, 'node', node,
                 'reason', reason, 'at', now, 'payload', task)
      publish(first, n)
      finish(id, field, payload)
    end
  else
    if redis.call('XACK', tasks, group, id) == 0 then
      redis.call('XDEL', tasks, id)
      result = 0
    else
      publish(first, n)
      finish(id, field, payload)
    end
  end
  out[#out + 1] = result
end
return out
"""
