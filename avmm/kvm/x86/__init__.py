"""x86-specific helpers of the KVM binding."""
