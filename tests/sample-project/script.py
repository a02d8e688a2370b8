"""A Python script the README runs with the host's interpreter (--rootfs host)."""
import os
import platform

print("python %s in %s, files: %s" % (platform.python_version(), os.getcwd(), " ".join(sorted(os.listdir()))))
