################################################################################
#
# mosdns
#
################################################################################

MOSDNS_VERSION = 5.3.4
MOSDNS_SITE = $(call github,IrineSistiana,mosdns,v$(MOSDNS_VERSION))
MOSDNS_LICENSE = GPL-3.0
MOSDNS_LICENSE_FILES = LICENSE

# Major-version module path (go.mod: module github.com/IrineSistiana/mosdns/v5).
MOSDNS_GOMOD = github.com/IrineSistiana/mosdns/v5
MOSDNS_GO_ENV = CGO_ENABLED=0
MOSDNS_LDFLAGS = -X main.version=v$(MOSDNS_VERSION)

# See mosdns.hash: the vendored tarball's hash is not recorded yet.
BR_NO_CHECK_HASH_FOR += $(MOSDNS_SOURCE)

define MOSDNS_INSTALL_CONFIG_DIR
	$(INSTALL) -d -m 0755 $(TARGET_DIR)/etc/mosdns
endef
MOSDNS_POST_INSTALL_TARGET_HOOKS += MOSDNS_INSTALL_CONFIG_DIR

$(eval $(golang-package))
