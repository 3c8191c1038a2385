################################################################################
#
# mihomo
#
################################################################################

MIHOMO_VERSION = 1.19.17
MIHOMO_SITE = $(call github,MetaCubeX,mihomo,v$(MIHOMO_VERSION))
MIHOMO_LICENSE = GPL-3.0
MIHOMO_LICENSE_FILES = LICENSE
MIHOMO_CPE_ID_VENDOR = metacubex

# go.mod says `module github.com/metacubex/mihomo` (lower case), which the
# golang infrastructure cannot infer from the GitHub owner's spelling.
MIHOMO_GOMOD = github.com/metacubex/mihomo

# Same build as upstream's Makefile: gVisor TUN stack, no cgo, version stamps.
MIHOMO_TAGS = with_gvisor
MIHOMO_GO_ENV = CGO_ENABLED=0
MIHOMO_LDFLAGS = \
	-X github.com/metacubex/mihomo/constant.Version=v$(MIHOMO_VERSION) \
	-X github.com/metacubex/mihomo/constant.BuildTime=buildroot

# The vendored tarball's hash (mihomo-$(MIHOMO_VERSION)-go2.tar.gz) could not
# be computed where this package was written (no network). Until it is
# recorded in mihomo.hash, skip its check; BR2_DOWNLOAD_FORCE_CHECK_HASHES=y
# overrides this and makes the missing hash an error.
BR_NO_CHECK_HASH_FOR += $(MIHOMO_SOURCE)

define MIHOMO_INSTALL_CONFIG_DIR
	$(INSTALL) -d -m 0755 $(TARGET_DIR)/etc/mihomo
endef
MIHOMO_POST_INSTALL_TARGET_HOOKS += MIHOMO_INSTALL_CONFIG_DIR

define MIHOMO_LINUX_CONFIG_FIXUPS
	$(call KCONFIG_ENABLE_OPT,CONFIG_TUN)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NFT_TPROXY)
	$(call KCONFIG_ENABLE_OPT,CONFIG_NFT_SOCKET)
endef

$(eval $(golang-package))
