# Writes TOTAL_GB to PATH in 64 MiB chunks, fdatasync after each; with LAG_MIB > 0 it drops
# the page cache of everything but the last LAG_MIB (posix_fadvise DONTNEED) as it goes.
# Prints wall and system CPU time per GB.  Usage: python3 pagecache.py PATH TOTAL_GB LAG_MIB
import os, time, resource, sys
path = sys.argv[1]; total_gb = int(sys.argv[2]); lag = int(sys.argv[3]) << 20
fd = os.open(path, os.O_WRONLY|os.O_CREAT|os.O_TRUNC, 0o644)
buf = os.urandom(1<<20) * 64
off = 0
for gb in range(total_gb):
    t = time.time(); r = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(16):
        os.write(fd, buf); os.fdatasync(fd); off += len(buf)
        if lag and off > lag:
            os.posix_fadvise(fd, 0, off - lag, os.POSIX_FADV_DONTNEED)
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"GB {gb+1}: {time.time()-t:.2f}s wall, sys {r2.ru_stime-r.ru_stime:.2f}s", flush=True)
os.close(fd); os.unlink(path)
