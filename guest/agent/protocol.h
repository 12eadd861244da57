/* Wire constants of the pytest-ignition agent protocol, version 1 (docs/agent-protocol.md).
 * Mirrored on the host side by pytest_ignition/agent.py: keep the two in step. */
#ifndef IGNITION_PROTOCOL_H
#define IGNITION_PROTOCOL_H

#define IG_MAGIC0 0x49u /* magic 0x4749 little-endian: the bytes "IG" */
#define IG_MAGIC1 0x47u
#define IG_VERSION 1u
#define IG_HEADER 12u
#define IG_MAX_PAYLOAD (1u << 20)
#define IG_CHUNK (64u * 1024u) /* largest STDOUT/STDERR/DATA/LIST payload the agent sends */

/* host -> agent */
#define T_PING 0x01
#define T_EXEC 0x02
#define T_STDIN 0x03
#define T_SIGNAL 0x04
#define T_PUT 0x05
#define T_DATA 0x06 /* both directions */
#define T_GET 0x07
#define T_SYNC 0x08
#define T_RESET 0x09 /* like PING, after ending every earlier request on the connection */
#define T_WINSIZE 0x0A /* u16 rows, u16 cols, u16 xpixel, u16 ypixel for a PTY exec */
/* agent -> host */
#define T_PONG 0x81
#define T_STDOUT 0x83
#define T_STDERR 0x84
#define T_EXIT 0x85
#define T_OK 0x87
#define T_STAT 0x88
#define T_LIST 0x89
#define T_ERROR 0xFF

/* TCP tunnels to/from 127.0.0.1 in the guest (docs/agent-protocol.md, "TCP tunnels").
 * host -> agent: 0x10..0x1F; agent -> host: 0x90..0x9F. */
#define T_TCP_CONNECT 0x10  /* u32 port, u32 window -> TCP_CONNECTED or ERROR */
#define T_TCP_DATA 0x11     /* bytes for the guest socket (at most the agent's window unacknowledged) */
#define T_TCP_CREDIT 0x12   /* u32 bytes the host has delivered: the agent may send that many more */
#define T_TCP_SHUTDOWN 0x13 /* the host side will send no more (half-close) */
#define T_TCP_CLOSE 0x14    /* u32 errno: 0 close, else reset; no answer */
#define T_TCP_LISTEN 0x15   /* u32 port -> OK or ERROR; then TCP_ACCEPT per connection */
#define T_TCP_ATTACH 0x16   /* u32 listen_chan, u32 conn_id, u32 window -> TCP_CONNECTED or ERROR */
#define T_TCP_REJECT 0x17   /* u32 conn_id, u32 errno (on the listen channel): reset it */
#define T_TCP_CONNECTED 0x90 /* u32 window: bytes the host may send before a TCP_CREDIT */
#define T_TCP_RDATA 0x91     /* bytes from the guest socket */
#define T_TCP_RCREDIT 0x92   /* u32 bytes the agent has written to the guest socket */
#define T_TCP_EOF 0x93       /* the guest peer will send no more */
#define T_TCP_CLOSED 0x94    /* u32 errno (0: both directions ended cleanly); the channel is free */
#define T_TCP_ACCEPT 0x95    /* u32 conn_id: a guest connection to a listener, waiting for ATTACH */

#define EXEC_SHELL 0x1u
#define EXEC_STDIN 0x2u
#define EXEC_PTY 0x4u /* under a new pty: session leader, controlling tty, stdout only */
#define EXIT_TIMED_OUT 0x1u
#define PUT_FILE 0u
#define PUT_DIR 1u
#define GET_STAT_ONLY 0x1u

/* ERROR codes: 1..999 are Linux errno values; protocol errors are >= 1000. */
#define E_BAD_MAGIC 1001
#define E_BAD_VERSION 1002
#define E_UNKNOWN_TYPE 1003
#define E_TOO_LARGE 1004
#define E_BAD_PAYLOAD 1005
#define E_UNKNOWN_CHAN 1006
#define E_CHAN_BUSY 1007
#define E_LIMIT 1008
#define E_STARTED 1009 /* sent on channel 0 when the agent opens a virtio-serial port */

#endif
