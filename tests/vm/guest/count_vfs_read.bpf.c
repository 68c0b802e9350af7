/* Test probe for the vm tier: counts vfs_read() calls made by one process on one inode.
 *
 * Hook: kprobe on vfs_read (the test VM's 6.1 kernel has CONFIG_KPROBES; the host
 * kernel here does not). The inode comes in as -DTARGET_INO=<n>ULL; the process
 * (tgid) goes into target_tgid[0] from user space after it is forked, so reads
 * made before that are not counted. Reading file->f_inode->i_ino dereferences
 * kernel structs through the compile-time headers: right in the VM, where the
 * headers match the running kernel.
 */
#include <linux/fs.h>

BPF_ARRAY(target_tgid, u32, 1);
BPF_ARRAY(reads, u64, 1);

int count_vfs_read(struct pt_regs *ctx, struct file *file)
{
    u32 zero = 0;
    u32 *tgid = target_tgid.lookup(&zero);

    if (!tgid || *tgid != (u32)(bpf_get_current_pid_tgid() >> 32))
        return 0;
    if (file->f_inode->i_ino != TARGET_INO)
        return 0;
    u64 *count = reads.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
