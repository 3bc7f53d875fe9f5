// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * The seed's classic sk_lookup echo dispatcher, in C, as the baseline that
 * steer-bench compares the Rust programs against. Same maps, names and
 * layouts as dispatch-ebpf's echo_dispatch.
 *
 * Built by steer-bench at run time; never commit the object:
 *   clang-19 -O2 -g -target bpf -c echo_dispatch.bpf.c -o echo_dispatch.bpf.o
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Ports to steer: destination port in host order, value unused. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} echo_ports SEC(".maps");

/* The one socket serving every listed port, at key 0; a u64 value lets
 * userspace read back the socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} echo_socket SEC(".maps");

SEC("sk_lookup")
int echo_dispatch(struct bpf_sk_lookup *ctx)
{
	const __u32 zero = 0;
	struct bpf_sock *sk;
	__u16 port;
	__u8 *open;
	long err;

	port = ctx->local_port;
	open = bpf_map_lookup_elem(&echo_ports, &port);
	if (!open)
		return SK_PASS;

	sk = bpf_map_lookup_elem(&echo_socket, &zero);
	if (!sk)
		return SK_DROP; /* listed but no socket: never fall through */

	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
