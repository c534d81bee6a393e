################################################################################
#
# blockswarm
#
################################################################################

# Built from this repository (the directory above the BR2_EXTERNAL tree).
BLOCKSWARM_VERSION = 0.1.0
BLOCKSWARM_SITE = $(BR2_EXTERNAL_BLOCKSWARM_PATH)/..
BLOCKSWARM_SITE_METHOD = local
BLOCKSWARM_LICENSE = proprietary
BLOCKSWARM_DEPENDENCIES = host-pkgconf udev
# The udev crate finds libudev through pkg-config.
BLOCKSWARM_CARGO_ENV = \
	PKG_CONFIG_ALLOW_CROSS=1 \
	PKG_CONFIG="$(PKG_CONFIG_HOST_BINARY)"
BLOCKSWARM_CARGO_BUILD_OPTS = --bin blockswarm

$(eval $(cargo-package))
