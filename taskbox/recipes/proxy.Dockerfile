# The taskbox egress proxy image: Debian's squid, run by taskbox as one small container per
# task in `allowlist` network mode. taskbox.images.proxy_recipe() replaces {base} with the same
# base image as the sandbox recipe; the hash of the resulting text names the image.
FROM {base}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends squid \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# taskbox passes the generated squid.conf in TASKBOX_SQUID_CONF; the root filesystem is
# read-only at run time, so the file goes to the /tmp tmpfs. squid runs as `proxy` (uid 13)
# from the start: no root, no capabilities, nothing to drop.
USER proxy
ENTRYPOINT ["sh", "-c", "printf '%s\\n' \"$TASKBOX_SQUID_CONF\" > /tmp/squid.conf && exec squid -N -f /tmp/squid.conf"]
