// One postgres.js connection attempt, for tests/fail_fast.rs. Prints one JSON line: how it
// ended, in how many milliseconds, and the error's code and message as postgres.js reports
// them. Usage: node connect.mjs HOST PORT verify|prefer CA CERT KEY CONNECT_TIMEOUT_S
import { readFileSync } from 'node:fs'
import postgres from 'postgres'

const [host, port, mode, ca, cert, key, timeout] = process.argv.slice(2)
const ssl = mode === 'prefer'
  ? 'prefer'
  : {
      ca: readFileSync(ca),
      cert: readFileSync(cert),
      key: readFileSync(key),
      // verify-ca: the chain is checked, the host name is not.
      checkServerIdentity: () => undefined
    }
const sql = postgres({
  host,
  port: Number(port),
  user: 'app',
  database: 'app',
  ssl,
  max: 1,
  connect_timeout: Number(timeout),
  onnotice: () => {}
})
const started = performance.now()
let result
try {
  await sql`select 1`
  result = { ok: true }
} catch (e) {
  result = { ok: false, code: e.code ?? null, message: String(e.message) }
}
result.ms = Math.round(performance.now() - started)
console.log(JSON.stringify(result))
await sql.end({ timeout: 0 })
