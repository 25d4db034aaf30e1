// Drives `pgmtls console` in headless Chromium with JavaScript disabled in the page, as an
// operator would with a keyboard and mouse: log in with the printed URL, add a rule (a bad
// one first), delete it, revoke a certificate, log out. Screenshots go to the directory given.
// Usage: node console.mjs LOGIN_URL SCREENSHOT_DIR
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

// axe-core's rules, run on every page visited; serious and critical violations fail the test.
const axeSource = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

const [loginUrl, shots] = process.argv.slice(2);
assert.ok(loginUrl && shots, 'usage: node console.mjs LOGIN_URL SCREENSHOT_DIR');
const origin = new URL(loginUrl).origin;

const browser = await chromium.launch({
  executablePath: process.env.PGMTLS_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const problems = [];
let styles = 0;
try {
  // No script in the page: the forms must work without it.
  const context = await browser.newContext({
    viewport: { width: 1280, height: 800 },
    javaScriptEnabled: false,
  });
  const page = await context.newPage();
  // CSP violations show up as console errors. Pages answered with 4xx on purpose (an inline
  // error is a 400, the login page a 401, the favicon that does not exist a 404) are logged
  // as failed loads too; those are left out, and the stylesheet is checked on its own.
  page.on('console', (m) => {
    const expected = /^Failed to load resource: the server responded with a status of 4\d\d/;
    if (m.type() === 'error' && !expected.test(m.text())) problems.push(m.text());
  });
  page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()}`));
  page.on('response', (r) => {
    if (new URL(r.url()).pathname === '/style.css') {
      if (r.status() === 200) styles += 1; else problems.push(`/style.css: ${r.status()}`);
    }
  });

  await page.goto(loginUrl);
  assert.equal(page.url(), `${origin}/`);
  assert.equal(await page.locator('h1').textContent(), 'Databases');
  const cookie = (await context.cookies()).find((c) => c.name === 'pgmtls_console');
  assert.ok(cookie, 'session cookie set');
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, 'Strict');
  await page.screenshot({ path: `${shots}/databases-1280.png`, fullPage: true });

  await page.getByRole('link', { name: 'app', exact: true }).click();
  assert.equal(page.url(), `${origin}/databases/app`);
  await page.getByText('0 of 60 rules').waitFor();

  // A CIDR with host bits: the CLI's message by the form, the typed value kept.
  await page.getByLabel(/CIDR block/).fill('10.0.0.1/8');
  await page.getByRole('button', { name: 'Add rule' }).click();
  const err = await page.locator('#rule-error').textContent();
  assert.match(err, /did you mean 10\.0\.0\.0\/8/);
  assert.equal(await page.getByLabel(/CIDR block/).inputValue(), '10.0.0.1/8');
  await page.screenshot({ path: `${shots}/rule-error-1280.png`, fullPage: true });

  // From the keyboard: type into the fields, Enter submits.
  await page.getByLabel(/CIDR block/).fill('198.51.100.0/24');
  await page.getByLabel(/Description/).focus();
  await page.keyboard.type('Browser <test>');
  await page.keyboard.press('Enter');
  await page.waitForURL(`${origin}/databases/app`);
  await page.getByText(/Added IP rule .* for 198\.51\.100\.0\/24/).waitFor();
  await page.getByText('1 of 60 rules').waitFor();
  await page.getByRole('cell', { name: 'Browser <test>', exact: true }).waitFor();
  await page.screenshot({ path: `${shots}/database-1280.png`, fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: `${shots}/database-390.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });

  // Delete: the confirmation box first.
  const row = page.getByRole('row').filter({ hasText: '198.51.100.0/24' });
  await row.getByRole('checkbox').check();
  await row.getByRole('button', { name: /Delete/ }).click();
  await page.getByText(/Deleted IP rule .* for 198\.51\.100\.0\/24/).waitFor();
  await page.getByText('0 of 60 rules').waitFor();

  // Revoke the first certificate.
  const cert = page.getByRole('row').filter({ has: page.getByRole('button', { name: 'Revoke' }) }).first();
  await cert.getByRole('checkbox').check();
  await cert.getByRole('button', { name: 'Revoke' }).click();
  await page.getByText(/Revoked certificate/).waitFor();

  // Accessibility: the pages visited, in a context of their own that may run axe-core's script
  // (the console's pages have none and their CSP forbids it), with the same session.
  const axeContext = await browser.newContext({ bypassCSP: true, viewport: { width: 1280, height: 800 } });
  await axeContext.addCookies(await context.cookies());
  const axePage = await axeContext.newPage();
  for (const path of ['/', '/databases/app', '/login']) {
    await axePage.goto(`${origin}${path}`);
    await axePage.evaluate(axeSource);
    const result = await axePage.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
    assert.ok(result.passes.length > 0, `axe ran no rules on ${path}`);
    for (const v of result.violations) {
      if (v.impact === 'serious' || v.impact === 'critical') {
        const where = v.nodes.map((n) => n.target.join(' ')).join(', ');
        problems.push(`axe ${path}: ${v.id} (${v.impact}): ${v.help} at ${where}`);
      }
    }
  }
  await axeContext.close();

  await page.getByRole('button', { name: 'Log out' }).click();
  // Until the login page has loaded: a new navigation would abort it.
  await page.waitForURL(`${origin}/login`, { waitUntil: 'load' });
  await page.goto(`${origin}/`);
  assert.equal(new URL(page.url()).pathname, '/login');
} finally {
  await browser.close();
}
assert.deepEqual(problems, [], 'console errors (a CSP violation, a failed load)');
assert.ok(styles > 0, 'the stylesheet was loaded');
console.log('browser: ok');
