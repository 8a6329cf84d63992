-- wrk script for benchmarks/serve.py: POST one prepared body (a multipart upload) on every request and
-- print the run's numbers as one JSON line, so the Python driver never measures anything itself.
--   wrk -t2 -c32 -d10s -s benchmarks/wrk_post.lua URL -- BODY_FILE CONTENT_TYPE

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = args[2]
end

-- benchmarks/wrk_report.lua, found next to this script whatever the working directory
done = dofile((debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "") .. "wrk_report.lua")
