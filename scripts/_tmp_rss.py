import subprocess, sys, time, os, psutil, glob
log, out = sys.argv[1], sys.argv[2]
subprocess.run(["rm", "-rf", out])
code = "import sys; from components.ingest import beam_pipeline as b; b.run(b.IngestConfig(input_patterns=(sys.argv[1],)), sys.argv[2], ['--direct_running_mode=in_memory','--direct_num_workers=1'])"
p = subprocess.Popen([sys.executable, "-c", code, log, out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
proc = psutil.Process(p.pid); t0 = time.time(); peak = 0
while p.poll() is None:
    try:
        rss = sum(q.memory_info().rss for q in [proc] + proc.children(recursive=True))
    except psutil.Error:
        rss = 0
    peak = max(peak, rss)
    temp = len(glob.glob(os.path.join(out, ".temp", "*"))) + len(glob.glob(os.path.join(out, "Split-*", "*")))
    print(f"{time.time()-t0:6.1f}s rss {rss/2**20:7.0f} MB files {temp}", flush=True)
    time.sleep(2)
print("peak", peak / 2**20, "rc", p.returncode)
