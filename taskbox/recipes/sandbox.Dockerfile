# The taskbox sandbox image. taskbox.images.recipe() replaces {base} with the base image
# (debian:bookworm-slim, or a locally bootstrapped taskbox-base:bookworm when Docker Hub is
# out of reach); the hash of the resulting text names the image, so editing this file
# makes `taskbox image build` rebuild.
FROM {base}

# One layer, lists removed in the same step, so the package index never ships in the image.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        git python3 python3-venv nodejs npm curl ca-certificates procps \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# uid/gid 1000 matches the common first user on the host, so files the agent writes in the
# bind-mounted workspace stay owned by that user. HOME is world-writable (sticky, like /tmp)
# so a container run as some other non-root uid still has a writable home for git/npm/pip.
RUN groupadd --gid 1000 agent \
 && useradd --uid 1000 --gid 1000 --home-dir /home/agent --create-home --shell /bin/bash agent \
 && chmod 1777 /home/agent \
 && mkdir -p /workspace \
 && chown agent:agent /workspace

ENV HOME=/home/agent
WORKDIR /workspace
USER agent

# Containers are long-lived and driven through exec; the main process only has to stay up.
CMD ["sleep", "infinity"]
