// The reference's whole flow in headless Chromium against a running `pgmtls serve` and
// PostgreSQL, page JavaScript off: log in with the printed URL, enable mTLS for a database
// (from the keyboard), add a rule, wait for the proxy to authorize it, download the bundle,
// unpack it and connect the real psql with the line the page shows, revoke the certificate in
// the page and see psql refused, delete the rule and see the page say so. Screenshots of each
// page at 1280x800 and 390 px wide go to SHOTS; axe-core runs on every page.
// Usage: node e2e.mjs LOGIN_URL SHOTS WORK_DIR PSQL LISTEN UPSTREAM PG_USER PG_DB
// (PGPASSWORD in the environment is psql's).
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

const axeSource = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
const [loginUrl, shots, work, psql, listen, upstream, pgUser, pgDb] = process.argv.slice(2);
assert.ok(pgDb, 'usage: node e2e.mjs LOGIN_URL SHOTS WORK_DIR PSQL LISTEN UPSTREAM PG_USER PG_DB');
const origin = new URL(loginUrl).origin;
const db = 'web';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const browser = await chromium.launch({
  executablePath: process.env.PGMTLS_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const problems = [];
const pagesSeen = new Set();
let held;
try {
  const context = await browser.newContext({
    viewport: { width: 1280, height: 800 },
    javaScriptEnabled: false,
    acceptDownloads: true,
  });
  const page = await context.newPage();
  page.on('console', (m) => {
    const expected = /^Failed to load resource: the server responded with a status of 4\d\d/;
    if (m.type() === 'error' && !expected.test(m.text())) problems.push(m.text());
  });

  // Both widths of the page as it is now.
  const shoot = async (name) => {
    // A page answering a POST (a refused change) is checked by axe below, posted again.
    if (!name.endsWith('error')) pagesSeen.add(new URL(page.url()).pathname);
    await page.screenshot({ path: `${shots}/${name}-1280.png`, fullPage: true });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: `${shots}/${name}-390.png`, fullPage: true });
    await page.setViewportSize({ width: 1280, height: 800 });
  };
  // Reloads until `text` is on the page: the proxy applies a change on its next reload.
  const reloadUntil = async (text, what) => {
    for (let i = 0; i < 120; i += 1) {
      if (await page.getByText(text).count() > 0) return;
      await sleep(250);
      await page.reload();
    }
    throw new Error(`${what}: ${text} never appeared`);
  };

  await page.goto(loginUrl);
  assert.equal(page.url(), `${origin}/`);
  await shoot('databases');

  // Enable mTLS, every field from the keyboard: Tab between them, Enter submits.
  await page.getByLabel(/Database name/).focus();
  await page.keyboard.type(db);
  await page.keyboard.press('Tab');
  await page.keyboard.type(listen);
  await page.keyboard.press('Tab');
  await page.keyboard.type(upstream);
  await page.getByLabel(/Type the database name again/).focus();
  await page.keyboard.type(db);
  await page.keyboard.press('Enter');
  await page.waitForURL(`${origin}/databases/${db}`);
  await page.getByText(`Enabled mTLS on ${db}`).waitFor();
  await reloadUntil('Operational', 'the proxy serving the new database');

  // A rule for loopback, where psql connects from, submitted with Enter.
  await page.getByLabel(/CIDR block/).fill('127.0.0.1/32');
  await page.getByLabel(/Description/).focus();
  await page.keyboard.type('psql on this host');
  await page.keyboard.press('Enter');
  await page.getByText(/Added IP rule .* for 127\.0\.0\.1\/32/).waitFor();
  const ruleRow = () => page.getByRole('row').filter({ hasText: '127.0.0.1/32' });
  for (let i = 0; i < 120 && (await ruleRow().getByText('Authorized', { exact: true }).count()) === 0; i += 1) {
    await sleep(250);
    await page.reload();
  }
  await ruleRow().getByText('Authorized', { exact: true }).waitFor({ timeout: 1000 });

  // Download the first certificate's bundle, as the browser saves it.
  const certRow = page.getByRole('row').filter({ has: page.getByRole('button', { name: 'Download .tar' }) }).first();
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    certRow.getByRole('button', { name: 'Download .tar' }).click(),
  ]);
  const files = `${work}/bundle`;
  mkdirSync(files, { recursive: true });
  const tarPath = `${work}/${download.suggestedFilename()}`;
  await download.saveAs(tarPath);
  assert.match(download.suggestedFilename(), new RegExp(`^${db}-.*\\.tar$`));
  execFileSync('tar', ['-xpf', tarPath, '-C', files]);
  console.log(`download: ${tarPath}`);

  // The psql line the page shows, run where the archive was unpacked; only the placeholders
  // for the user and database are filled in.
  const shown = (await page.locator('pre code').filter({ hasText: /^psql / }).first().textContent()).trim();
  const conninfo = shown.replace(/^psql "/, '').replace(/"$/, '')
    .replace('dbname=DBNAME', `dbname=${pgDb}`).replace('user=USER', `user=${pgUser}`);
  assert.notEqual(conninfo, shown);
  const run = (sql) => spawnSync(psql, ['-X', '-A', '-t', '-w', '-d', conninfo, '-c', sql], {
    cwd: files, encoding: 'utf8', timeout: 30000, env: { ...process.env, PGCONNECT_TIMEOUT: '10' },
  });
  const ok = run("SELECT 'through the console''s bundle'");
  assert.equal(ok.status, 0, `psql failed: ${ok.stderr}`);
  assert.equal(ok.stdout.trim(), "through the console's bundle");

  // A refusal for the chart: psql without the client certificate.
  const noCert = spawnSync(psql, ['-X', '-w', '-d', conninfo.replace(/sslcert=\S+ sslkey=\S+ /, ''), '-c', 'SELECT 1'], {
    cwd: files, encoding: 'utf8', timeout: 30000,
  });
  assert.notEqual(noCert.status, 0, 'psql without a certificate got in');

  // A session held open, for the Activity section.
  held = spawn(psql, ['-X', '-w', '-d', conninfo, '-c', 'SELECT pg_sleep(300)'], { cwd: files, stdio: 'ignore' });
  await reloadUntil(/^active$/, 'the held session in Live sessions');
  await page.getByText(/tallest is/).waitFor();
  await shoot('database');
  // The first screen of it, from the top, as docs/console.png shows it.
  await page.goto(`${origin}/databases/${db}`);
  await page.screenshot({ path: `${shots}/database-view-1280.png` });

  // Revoke: the confirmation box, then the button; psql is refused once the proxy has the CRL.
  await certRow.getByRole('checkbox').check();
  await certRow.getByRole('button', { name: 'Revoke' }).click();
  await page.getByText(/Revoked certificate/).waitFor();
  let refused;
  for (let i = 0; i < 80; i += 1) {
    refused = run('SELECT 1');
    if (refused.status !== 0 && /certificate revoked/.test(refused.stderr)) break;
    await sleep(250);
  }
  assert.match(refused.stderr, /certificate revoked/, `psql after the revocation: ${refused.stderr}`);
  console.log(`psql refused: ${refused.stderr.trim().split('\n').pop()}`);
  await reloadUntil('client_cert_revoked', 'the revocation in the refusals chart');

  // Delete the rule, from the keyboard: Space ticks the box, Enter on the button.
  await ruleRow().getByRole('checkbox').focus();
  await page.keyboard.press('Space');
  await ruleRow().getByRole('button', { name: /Delete/ }).focus();
  await page.keyboard.press('Enter');
  await page.getByText(/Deleted IP rule .* for 127\.0\.0\.1\/32/).waitFor();
  await page.getByText('No IP rules: nobody can connect.').waitFor();
  await page.getByText('0 of 60 rules').waitFor();
  await shoot('database-after');

  // A refused change, and its page.
  await page.getByLabel(/CIDR block/).fill('10.0.0.1/8');
  await page.getByRole('button', { name: 'Add rule' }).click();
  await page.locator('#rule-error').waitFor();
  await shoot('rule-error');

  await page.goto(`${origin}/`);
  const row = page.getByRole('row').filter({ has: page.getByRole('link', { name: db, exact: true }) });
  await row.getByText('Operational').waitFor();
  await shoot('databases-after');

  // Accessibility on every page visited, and the login and not-found pages, with axe-core in
  // a context that may run its script and shares the session.
  const axeContext = await browser.newContext({ bypassCSP: true, viewport: { width: 1280, height: 800 } });
  await axeContext.addCookies(await context.cookies());
  const axePage = await axeContext.newPage();
  const axeCheck = async (path) => {
    await axePage.evaluate(axeSource);
    const result = await axePage.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
    assert.ok(result.passes.length > 0, `axe ran no rules on ${path}`);
    for (const v of result.violations) {
      if (v.impact === 'serious' || v.impact === 'critical') {
        const where = v.nodes.map((n) => n.target.join(' ')).join(', ');
        problems.push(`axe ${path}: ${v.id} (${v.impact}): ${v.help} at ${where}`);
      }
    }
  };
  for (const path of [...pagesSeen, '/nowhere', '/login']) {
    await axePage.goto(`${origin}${path}`);
    await axeCheck(path);
  }
  // The database page with a refused change's message by its form.
  await axePage.goto(`${origin}/databases/${db}`);
  await axePage.getByLabel(/CIDR block/).fill('10.0.0.1/8');
  await axePage.getByRole('button', { name: 'Add rule' }).click();
  await axePage.locator('#rule-error').waitFor();
  await axeCheck(`/databases/${db} (refused rule)`);
  await axeContext.close();
} finally {
  if (held) held.kill();
  await browser.close();
}
assert.deepEqual(problems, [], 'console errors or accessibility violations');
console.log('e2e: ok');
