# The product page's walkthrough, unchanged: upload a dataset once, attach it
# to four sandboxes, each sees its own copy under /data. See README.md
# ("Volumes walkthrough") for how to run it against a local server.
from declaw import Sandbox, Volumes, VolumeAttachment

# 1. Upload the dataset once.
with open("training.tar.gz", "rb") as f:
    vol = Volumes.create(name="training-set", data=f)
attachment = VolumeAttachment(volume_id=vol.volume_id, mount_path="/data")

# 2. Create N sandboxes, each attaching the same volume.
sandboxes = [
    Sandbox.create(template="python", timeout=300, volumes=[attachment])
    for _ in range(4)
]

try:
    # Each sandbox sees its own copy of /data; writes don't cross sandbox boundaries.
    for i, sbx in enumerate(sandboxes):
        r = sbx.commands.run("wc -l /data/rows.csv")
        print(f"sandbox {i}: {r.stdout.strip()}")
finally:
    for sbx in sandboxes:
        sbx.kill()
    Volumes.delete(vol.volume_id)
