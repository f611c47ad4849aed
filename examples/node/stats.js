#!/usr/bin/env node
// Prints each topic's stats and its consumer groups' cursors.
//
//   node stats.js [TOPIC]...        (no TOPIC: every topic)

import { parseArgs } from 'node:util';

import { connect, DEFAULT_ADDR, DEFAULT_PROTO, statusName, unary } from './lib/sluice.js';

const { values, positionals: topics } = parseArgs({
  allowPositionals: true,
  options: {
    addr: { type: 'string', default: DEFAULT_ADDR },
    proto: { type: 'string', default: DEFAULT_PROTO },
  },
});

// Unix milliseconds (int64, a decimal string here) as UTC text; "-" for 0 (never).
const when = (ms) => (Number(ms) ? new Date(Number(ms)).toISOString() : '-');

const client = connect(values.addr, values.proto);
try {
  const { stats } = await unary(client, 'getTopicStats', { topics });
  for (const s of stats) {
    console.log(
      `${s.topic}: ${s.totalMessages} messages, sequences ${s.firstSequence}..${s.lastSequence} ` +
        `(last stored ${when(s.lastMessageTimestamp)})`,
    );
    for (const g of s.consumerGroups) {
      console.log(
        `  group ${g.groupName}: cursor ${g.cursorSequence}, pending ${g.pendingCount}, ` +
          `last ack ${when(g.lastAckTimestamp)}`,
      );
    }
  }
} catch (err) {
  if (err.code === undefined) throw err;
  // NOT_FOUND names an unknown topic.
  console.error(`stats: ${statusName(err.code)}: ${err.details}`);
  process.exitCode = 1;
} finally {
  client.close();
}
