"""The bundled VMM: a KVM microVM monitor written in Python over cffi.

One module per concern: ``kvm`` (ioctls, System/Vm/Vcpu), ``memory`` (guest RAM),
``x86_64/`` (boot layout), ``devices/`` (bus, legacy devices, virtio), ``snapshot``
and ``machine`` (assembling a VM). See docs/architecture.md.
"""
