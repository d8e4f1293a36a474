# The agent CLIs layer: the sandbox image plus tmux (detachable interactive runs) and the agent
# CLIs from npm at pinned versions. taskbox.images.agents_recipe() replaces {base} (the
# sandbox image's content-addressed tag) and {packages}; the hash of the resulting text names
# the image. The build step alone may use the host's network and npm settings (registry, CA
# bundle): the CA file is copied in for the install and removed in the same step. The install
# runs with a throwaway HOME, so no root-owned file lands in the agent's home.
FROM {base}
USER root
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tmux \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY npm-build/ /tmp/npm-build/
RUN set -e; if [ -s /tmp/npm-build/ca.pem ]; then export npm_config_cafile=/tmp/npm-build/ca.pem; fi; \
    if [ -s /tmp/npm-build/registry ]; then export npm_config_registry="$(cat /tmp/npm-build/registry)"; fi; \
    HOME=/tmp/npm-build/home npm install -g --no-audit --no-fund --no-update-notifier --prefix /usr/local {packages}; \
    rm -rf /tmp/npm-build /root/.npm
USER agent
