// Test-only SMART on FHIR authorization server and protected FHIR endpoint, on 127.0.0.1.
//
// oidc-provider (a certified OAuth 2.0 / OpenID Connect server) runs the authorization-code flow
// with PKCE (S256 required) and the SMART scopes; its development login and consent pages stand
// in for the EHR's. Beside it, /fhir is the local test FHIR server (sekmet) behind bearer tokens
// issued here, with /fhir/.well-known/smart-configuration (SMART App Launch 2.x discovery).
// The "EHR" part: GET /ehr/launch?patient=ID creates an opaque launch value; the token response
// of a code obtained with that launch carries "patient" (SMART launch context).
//
// Env: AS_PORT, FHIR_UPSTREAM (sekmet base URL), CLIENT_ID, REDIRECT_URI.
import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.env.AS_PORT);
const upstream = process.env.FHIR_UPSTREAM.replace(/\/$/, '');
const root = `http://127.0.0.1:${port}`;
const fhirBase = `${root}/fhir`;
const clientId = process.env.CLIENT_ID;
const redirectUri = process.env.REDIRECT_URI;

const types = ['Patient', 'Condition', 'Observation', 'Procedure', 'MedicationRequest',
  'MedicationStatement', 'MedicationAdministration', 'MedicationDispense', 'DiagnosticReport',
  'Medication', 'AllergyIntolerance', 'ResearchSubject'];
// SMART 2.x scopes this server knows: read+search in the patient compartment or as the user.
const smartScopes = [
  ...types.map((t) => `patient/${t}.rs`),
  ...types.map((t) => `user/${t}.rs`),
];

const launches = new Map(); // launch value -> patient id
const codes = new Map(); // authorization code -> patient id
const issued = []; // {scope, patient} of every token issued (the tests read it)

const provider = new Provider(root, {
  clients: [{
    client_id: clientId,
    token_endpoint_auth_method: 'none', // a SMART public client: PKCE instead of a secret
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  scopes: ['openid', 'launch', 'launch/patient'],
  extraParams: ['launch', 'aud'],
  pkce: { methods: ['S256'], required: () => true },
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // SMART sends the FHIR base as "aud"; it is the one resource server here.
      defaultResource: () => fhirBase,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        if (resource !== fhirBase) throw new Provider.errors.InvalidTarget();
        return { scope: smartScopes.join(' '), audience: fhirBase, accessTokenFormat: 'opaque',
          accessTokenTTL: 300 };
      },
    },
  },
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
});
provider.proxy = false;

provider.use(async (ctx, next) => {
  await next();
  // Remember which launch a code was issued for (the redirect carries the code).
  const location = ctx.response.get('location');
  const launch = ctx.oidc?.params?.launch;
  if (location && location.startsWith(redirectUri)) {
    const code = new URL(location).searchParams.get('code');
    if (code) codes.set(code, { patient: launches.get(launch), requested: ctx.oidc.params.scope });
  }
  if (ctx.path === '/token' && ctx.body && ctx.body.access_token) {
    const { patient, requested } = codes.get(ctx.oidc?.params?.code) || {};
    if (patient) ctx.body.patient = patient;
    issued.push({ requested, scope: ctx.body.scope, patient: patient || null });
  }
});

const smartConfiguration = {
  issuer: root,
  authorization_endpoint: `${root}/auth`,
  token_endpoint: `${root}/token`,
  grant_types_supported: ['authorization_code'],
  code_challenge_methods_supported: ['S256'],
  token_endpoint_auth_methods_supported: ['none'],
  scopes_supported: ['launch', 'launch/patient', ...smartScopes],
  response_types_supported: ['code'],
  capabilities: ['launch-ehr', 'launch-standalone', 'client-public', 'context-ehr-patient',
    'context-standalone-patient', 'permission-patient', 'permission-user', 'permission-v2'],
};

function send(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'Content-Type': type });
  res.end(typeof body === 'string' ? body : JSON.stringify(body));
}

async function fhir(req, res) {
  if (req.url === '/fhir/.well-known/smart-configuration') return send(res, 200, smartConfiguration);
  const auth = req.headers.authorization || '';
  const token = auth.startsWith('Bearer ') ? auth.slice(7) : null;
  const found = token ? await provider.AccessToken.find(token) : undefined;
  if (!found) return send(res, 401, { resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code: 'login', diagnostics: 'bearer token required' }] },
  'application/fhir+json');
  if (req.method !== 'GET') return send(res, 405, '');
  const answer = await fetch(upstream + req.url.slice('/fhir'.length), {
    headers: { Accept: 'application/fhir+json' },
  });
  // Paging links name the upstream: give them this base, as a real proxy would.
  const text = (await answer.text()).split(upstream).join(fhirBase);
  return send(res, answer.status, text, answer.headers.get('content-type') || 'application/fhir+json');
}

const callback = provider.callback();
http.createServer((req, res) => {
  if (req.url.startsWith('/fhir/') || req.url === '/fhir') {
    fhir(req, res).catch((err) => send(res, 502, { error: String(err) }));
    return;
  }
  const url = new URL(req.url, root);
  if (url.pathname === '/ehr/launch') {
    const launch = crypto.randomBytes(16).toString('hex');
    launches.set(launch, url.searchParams.get('patient'));
    return send(res, 200, { launch });
  }
  if (url.pathname === '/test/issued') return send(res, 200, issued);
  return callback(req, res);
}).listen(port, '127.0.0.1', () => {
  process.stdout.write(`ready ${root}\n`);
});
