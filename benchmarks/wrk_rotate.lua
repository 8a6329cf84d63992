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

-- benchmarks/wrk_report.lua, found next to this script whatever the working directory
done = dofile((debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "") .. "wrk_report.lua")
