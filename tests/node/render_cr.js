#!/usr/bin/env node
// Renders <Connect><ConversationRelay> documents with the Node twilio SDK, for
// tests/test_twiml_node.py (the Python rendering is compared with these after C14N).
//
// stdin: JSON {"cases": [{"id": str, "connect": {attr: str}, "relay": {attr: str},
//                         "languages": [{attr: str}], "parameters": [[name, value]]}]}
// stdout: JSON {"twilio": version, "documents": {id: xml}}
// Attribute keys go to the SDK verbatim (camelCase, as on the wire); the SDK emits them as given.
'use strict';

const fs = require('fs');
const twilio = require('twilio');
const { version } = require('twilio/package.json');

function render(spec) {
  const response = new twilio.twiml.VoiceResponse();
  const connect = response.connect(spec.connect || {});
  const relay = connect.conversationRelay(spec.relay || {});
  for (const language of spec.languages || []) {
    relay.language(language);
  }
  for (const [name, value] of spec.parameters || []) {
    relay.parameter({ name, value });
  }
  return response.toString();
}

const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const documents = {};
for (const spec of input.cases) {
  documents[spec.id] = render(spec);
}
process.stdout.write(JSON.stringify({ twilio: version, documents }));
