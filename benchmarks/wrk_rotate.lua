-- wrk script for benchmarks/serve_hostile.py: send prepared raw HTTP requests in rotation (each file one
-- whole request, its headers included, so a Content-Length may lie), and print the numbers as one JSON line.
--   wrk -t1 -c16 -d10s -s benchmarks/wrk_rotate.lua URL -- FILE1 FILE2 ...

local requests = {}
local next_index = 1

function init(args)
  for i = 1, #args do
    local file = assert(io.open(args[i], "rb"))
    requests[#requests + 1] = file:read("*a")
    file:close()
  end
end

function request()
  local raw = requests[next_index]
  next_index = next_index % #requests + 1
  return raw
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "non_2xx": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
