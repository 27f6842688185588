"""QAPI declarations of what QEMU 7.2 accepts but the emulator does not emulate.

Drivers such as nbd, iscsi or vmdk, image creation for formats other than file and qcow2,
and the blockdev-snapshot-internal-sync action are declared as qapi/*.json declares them, so
that their arguments are checked exactly as QEMU checks them: a missing member, a wrong type
or an unknown value gets QEMU's error text. Only arguments that QEMU would accept reach the
emulator's boundary ("Unknown driver", "Driver does not support blockdev-create", "Action
'...' is not supported"). ``test_declared_schemas_match_qemu`` holds every branch against a
real binary's query-qmp-schema.
"""

from __future__ import annotations

from emulator.qmp import schema

# -- qapi/sockets.json, qapi/common.json ---------------------------------------------------------
schema.enum("SocketAddressType", ["inet", "unix", "vsock", "fd"])
schema.struct("InetSocketAddressBase", {"host": "str", "port": "str"})
schema.struct("InetSocketAddress", {"*numeric": "bool", "*to": "uint16", "*ipv4": "bool",
                                    "*ipv6": "bool", "*keep-alive": "bool", "*mptcp": "bool"},
              base="InetSocketAddressBase")
schema.struct("UnixSocketAddress", {"path": "str", "*abstract": "bool", "*tight": "bool"})
schema.struct("VsockSocketAddress", {"cid": "str", "port": "str"})
schema.struct("String", {"str": "str"})
schema.union("SocketAddress", base={"type": "SocketAddressType"}, discriminator="type",
             branches={"inet": "InetSocketAddress", "unix": "UnixSocketAddress",
                       "vsock": "VsockSocketAddress", "fd": "String"})

# -- blockdev-add: BlockdevOptions branches (qapi/block-core.json) ----------------------------
schema.enum("OnCbwError", ["break-guest-write", "break-snapshot"])
schema.enum("QuorumReadPattern", ["quorum", "fifo"])
schema.enum("IscsiTransport", ["tcp", "iser"])
schema.enum("IscsiHeaderDigest", ["crc32c", "none", "crc32c-none", "none-crc32c"])
schema.enum("NFSTransport", ["inet"])
schema.enum("BlockdevQcowEncryptionFormat", ["aes"])
schema.enum("RbdAuthMode", ["cephx", "none"])
schema.enum("RbdImageEncryptionFormat", ["luks", "luks2"])
schema.enum("ReplicationMode", ["primary", "secondary"])
schema.enum("SshHostKeyCheckMode", ["none", "hash", "known_hosts"])
schema.enum("SshHostKeyCheckHashType", ["md5", "sha1", "sha256"])

schema.struct("BlockdevOptionsGenericCOWFormat", {"*backing": "BlockdevRefOrNull"},
              base="BlockdevOptionsGenericFormat")
schema.struct("BlockdevOptionsLUKS", {"*key-secret": "str"},
              base="BlockdevOptionsGenericFormat")
schema.struct("BlockdevOptionsPreallocate", {"*prealloc-align": "int", "*prealloc-size": "int"},
              base="BlockdevOptionsGenericFormat")
schema.struct("BlockdevOptionsCor", {"*bottom": "str"}, base="BlockdevOptionsGenericFormat")
schema.struct("BlockdevOptionsCbw", {"target": "BlockdevRef", "*bitmap": "BlockDirtyBitmap",
                                     "*on-cbw-error": "OnCbwError", "*cbw-timeout": "uint32"},
              base="BlockdevOptionsGenericFormat")
schema.struct("BlockdevOptionsThrottle", {"throttle-group": "str", "file": "BlockdevRef"})
schema.struct("BlockdevOptionsBlkreplay", {"image": "BlockdevRef"})
schema.struct("BlockdevOptionsBlkverify", {"test": "BlockdevRef", "raw": "BlockdevRef"})
schema.struct("BlockdevOptionsBlklogwrites", {
    "file": "BlockdevRef", "log": "BlockdevRef", "*log-sector-size": "uint32",
    "*log-append": "bool", "*log-super-update-interval": "uint64"})
schema.struct("BlockdevOptionsQuorum", {
    "*blkverify": "bool", "children": ["BlockdevRef"], "vote-threshold": "int",
    "*rewrite-corrupted": "bool", "*read-pattern": "QuorumReadPattern"})
schema.struct("BlockdevOptionsVVFAT", {"dir": "str", "*fat-type": "int", "*floppy": "bool",
                                       "*label": "str", "*rw": "bool"})
schema.struct("BlockdevOptionsCurlBase", {
    "url": "str", "*readahead": "int", "*timeout": "int", "*username": "str",
    "*password-secret": "str", "*proxy-username": "str", "*proxy-password-secret": "str"})
schema.struct("BlockdevOptionsCurlHttp", {"*cookie": "str", "*cookie-secret": "str"},
              base="BlockdevOptionsCurlBase")
schema.struct("BlockdevOptionsCurlHttps", {"*cookie": "str", "*sslverify": "bool",
                                           "*cookie-secret": "str"},
              base="BlockdevOptionsCurlBase")
schema.struct("BlockdevOptionsCurlFtp", {}, base="BlockdevOptionsCurlBase")
schema.struct("BlockdevOptionsCurlFtps", {"*sslverify": "bool"}, base="BlockdevOptionsCurlBase")
schema.struct("BlockdevOptionsGluster", {"volume": "str", "path": "str",
                                         "server": ["SocketAddress"], "*debug": "int",
                                         "*logfile": "str"})
schema.struct("BlockdevOptionsIscsi", {
    "transport": "IscsiTransport", "portal": "str", "target": "str", "*lun": "int",
    "*user": "str", "*password-secret": "str", "*initiator-name": "str",
    "*header-digest": "IscsiHeaderDigest", "*timeout": "int"})
schema.struct("BlockdevOptionsNbd", {
    "server": "SocketAddress", "*export": "str", "*tls-creds": "str", "*tls-hostname": "str",
    "*x-dirty-bitmap": "str", "*reconnect-delay": "uint32", "*open-timeout": "uint32"})
schema.struct("NFSServer", {"type": "NFSTransport", "host": "str"})
schema.struct("BlockdevOptionsNfs", {
    "server": "NFSServer", "path": "str", "*user": "int", "*group": "int",
    "*tcp-syn-count": "int", "*readahead-size": "int", "*page-cache-size": "int",
    "*debug": "int"})
schema.struct("BlockdevOptionsNVMe", {"device": "str", "namespace": "int"})
schema.union("BlockdevQcowEncryption", base={"format": "BlockdevQcowEncryptionFormat"},
             discriminator="format", branches={"aes": "QCryptoBlockOptionsQCow"})
schema.struct("BlockdevOptionsQcow", {"*encrypt": "BlockdevQcowEncryption"},
              base="BlockdevOptionsGenericCOWFormat")
schema.struct("RbdEncryptionOptionsLUKSBase", {"key-secret": "str"})
schema.struct("RbdEncryptionOptionsLUKS", {}, base="RbdEncryptionOptionsLUKSBase")
schema.struct("RbdEncryptionOptionsLUKS2", {}, base="RbdEncryptionOptionsLUKSBase")
schema.union("RbdEncryptionOptions", base={"format": "RbdImageEncryptionFormat"},
             discriminator="format", branches={"luks": "RbdEncryptionOptionsLUKS",
                                               "luks2": "RbdEncryptionOptionsLUKS2"})
schema.struct("BlockdevOptionsRbd", {
    "pool": "str", "*namespace": "str", "image": "str", "*conf": "str", "*snapshot": "str",
    "*encrypt": "RbdEncryptionOptions", "*user": "str",
    "*auth-client-required": ["RbdAuthMode"], "*key-secret": "str",
    "*server": ["InetSocketAddressBase"]})
schema.struct("BlockdevOptionsReplication", {"mode": "ReplicationMode", "*top-id": "str"},
              base="BlockdevOptionsGenericFormat")
schema.struct("SshHostKeyHash", {"type": "SshHostKeyCheckHashType", "hash": "str"})
schema.union("SshHostKeyCheck", base={"mode": "SshHostKeyCheckMode"}, discriminator="mode",
             branches={"hash": "SshHostKeyHash"})
schema.struct("BlockdevOptionsSsh", {"server": "InetSocketAddress", "path": "str",
                                     "*user": "str", "*host-key-check": "SshHostKeyCheck"})

UNEMULATED_BLOCKDEV_BRANCHES = {
    "blklogwrites": "BlockdevOptionsBlklogwrites", "blkreplay": "BlockdevOptionsBlkreplay",
    "blkverify": "BlockdevOptionsBlkverify", "bochs": "BlockdevOptionsGenericFormat",
    "cloop": "BlockdevOptionsGenericFormat", "compress": "BlockdevOptionsGenericFormat",
    "copy-before-write": "BlockdevOptionsCbw", "copy-on-read": "BlockdevOptionsCor",
    "dmg": "BlockdevOptionsGenericFormat", "ftp": "BlockdevOptionsCurlFtp",
    "ftps": "BlockdevOptionsCurlFtps", "gluster": "BlockdevOptionsGluster",
    "host_cdrom": "BlockdevOptionsFile", "host_device": "BlockdevOptionsFile",
    "http": "BlockdevOptionsCurlHttp", "https": "BlockdevOptionsCurlHttps",
    "iscsi": "BlockdevOptionsIscsi", "luks": "BlockdevOptionsLUKS", "nbd": "BlockdevOptionsNbd",
    "nfs": "BlockdevOptionsNfs", "nvme": "BlockdevOptionsNVMe",
    "parallels": "BlockdevOptionsGenericFormat", "preallocate": "BlockdevOptionsPreallocate",
    "qcow": "BlockdevOptionsQcow", "qed": "BlockdevOptionsGenericCOWFormat",
    "quorum": "BlockdevOptionsQuorum", "rbd": "BlockdevOptionsRbd",
    "replication": "BlockdevOptionsReplication", "snapshot-access":
    "BlockdevOptionsGenericFormat", "ssh": "BlockdevOptionsSsh",
    "throttle": "BlockdevOptionsThrottle", "vdi": "BlockdevOptionsGenericFormat",
    "vhdx": "BlockdevOptionsGenericFormat", "vmdk": "BlockdevOptionsGenericCOWFormat",
    "vpc": "BlockdevOptionsGenericFormat", "vvfat": "BlockdevOptionsVVFAT",
}

# -- blockdev-create: BlockdevCreateOptions branches --------------------------------------------
schema.enum("BlockdevVhdxSubformat", ["dynamic", "fixed"])
schema.enum("BlockdevVmdkSubformat", ["monolithicSparse", "monolithicFlat",
                                      "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                                      "streamOptimized"])
schema.enum("BlockdevVmdkAdapterType", ["ide", "buslogic", "lsilogic", "legacyESX"])
schema.enum("BlockdevVpcSubformat", ["dynamic", "fixed"])
schema.struct("RbdEncryptionCreateOptionsLUKSBase", {"*cipher-alg": "QCryptoCipherAlgorithm"},
              base="RbdEncryptionOptionsLUKSBase")
schema.struct("RbdEncryptionCreateOptionsLUKS", {}, base="RbdEncryptionCreateOptionsLUKSBase")
schema.struct("RbdEncryptionCreateOptionsLUKS2", {}, base="RbdEncryptionCreateOptionsLUKSBase")
schema.union("RbdEncryptionCreateOptions", base={"format": "RbdImageEncryptionFormat"},
             discriminator="format", branches={"luks": "RbdEncryptionCreateOptionsLUKS",
                                               "luks2": "RbdEncryptionCreateOptionsLUKS2"})
schema.struct("BlockdevCreateOptionsGluster", {"location": "BlockdevOptionsGluster",
                                               "size": "size", "*preallocation": "PreallocMode"})
schema.struct("BlockdevCreateOptionsLUKS", {"file": "BlockdevRef", "size": "size",
                                            "*preallocation": "PreallocMode"},
              base="QCryptoBlockCreateOptionsLUKS")
schema.struct("BlockdevCreateOptionsNfs", {"location": "BlockdevOptionsNfs", "size": "size"})
schema.struct("BlockdevCreateOptionsParallels", {"file": "BlockdevRef", "size": "size",
                                                 "*cluster-size": "size"})
schema.struct("BlockdevCreateOptionsQcow", {"file": "BlockdevRef", "size": "size",
                                            "*backing-file": "str",
                                            "*encrypt": "QCryptoBlockCreateOptions"})
schema.struct("BlockdevCreateOptionsQed", {
    "file": "BlockdevRef", "size": "size", "*backing-file": "str",
    "*backing-fmt": "BlockdevDriver", "*cluster-size": "size", "*table-size": "int"})
schema.struct("BlockdevCreateOptionsRbd", {
    "location": "BlockdevOptionsRbd", "size": "size", "*cluster-size": "size",
    "*encrypt": "RbdEncryptionCreateOptions"})
schema.struct("BlockdevCreateOptionsSsh", {"location": "BlockdevOptionsSsh", "size": "size"})
schema.struct("BlockdevCreateOptionsVdi", {"file": "BlockdevRef", "size": "size",
                                           "*preallocation": "PreallocMode"})
schema.struct("BlockdevCreateOptionsVhdx", {
    "file": "BlockdevRef", "size": "size", "*log-size": "size", "*block-size": "size",
    "*subformat": "BlockdevVhdxSubformat", "*block-state-zero": "bool"})
schema.struct("BlockdevCreateOptionsVmdk", {
    "file": "BlockdevRef", "size": "size", "*extents": ["BlockdevRef"],
    "*subformat": "BlockdevVmdkSubformat", "*backing-file": "str",
    "*adapter-type": "BlockdevVmdkAdapterType", "*hwversion": "str", "*toolsversion": "str",
    "*zeroed-grain": "bool"})
schema.struct("BlockdevCreateOptionsVpc", {"file": "BlockdevRef", "size": "size",
                                           "*subformat": "BlockdevVpcSubformat",
                                           "*force-size": "bool"})

UNEMULATED_CREATE_BRANCHES = {
    "gluster": "BlockdevCreateOptionsGluster", "luks": "BlockdevCreateOptionsLUKS",
    "nfs": "BlockdevCreateOptionsNfs", "parallels": "BlockdevCreateOptionsParallels",
    "qcow": "BlockdevCreateOptionsQcow", "qed": "BlockdevCreateOptionsQed",
    "rbd": "BlockdevCreateOptionsRbd", "ssh": "BlockdevCreateOptionsSsh",
    "vdi": "BlockdevCreateOptionsVdi", "vhdx": "BlockdevCreateOptionsVhdx",
    "vmdk": "BlockdevCreateOptionsVmdk", "vpc": "BlockdevCreateOptionsVpc",
}

# -- transaction: TransactionAction branches ------------------------------------------------------
schema.struct("BlockdevSnapshotInternal", {"device": "str", "name": "str"})

UNEMULATED_ACTIONS = {"blockdev-snapshot-internal-sync": "BlockdevSnapshotInternal"}
