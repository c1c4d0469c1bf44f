-- wrk script: POST an OpenAI chat completion request and count answers by status.
-- Usage: wrk -t1 -c64 -d5s -s scripts/limiter/wrk-post.lua http://127.0.0.1:P/v1/chat/completions
-- At the end it prints the status counts and the admitted (200) rate over the run's duration.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-test"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"wrk probe"}]}'

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for code, n in pairs(s) do
      total[code] = (total[code] or 0) + n
    end
  end
  local secs = summary.duration / 1e6
  local codes = {}
  for code in pairs(total) do table.insert(codes, code) end
  table.sort(codes)
  local parts = {}
  for _, code in ipairs(codes) do table.insert(parts, string.format('"%d":%d', code, total[code])) end
  io.write(string.format('{"wrk_seconds":%.3f,"requests":%d,"status":{%s},"admitted_per_s":%.1f,"offered_per_s":%.1f}\n',
    secs, summary.requests, table.concat(parts, ","), (total[200] or 0) / secs, summary.requests / secs))
end
