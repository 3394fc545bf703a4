package cape.verify;

import cape.errors.CertificateExpiredException;
import cape.errors.ChainException;
import cape.errors.DebugEnclaveException;
import cape.errors.DocumentExpiredException;
import cape.errors.DocumentTimestampException;
import cape.errors.FormatException;
import cape.errors.NonceMismatchException;
import cape.errors.PcrMismatchException;
import cape.errors.SignatureException;
import java.io.ByteArrayInputStream;
import java.nio.ByteBuffer;
import java.security.AlgorithmParameters;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.security.PublicKey;
import java.security.Signature;
import java.security.cert.CertPathBuilder;
import java.security.cert.CertStore;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.CollectionCertStoreParameters;
import java.security.cert.PKIXBuilderParameters;
import java.security.cert.TrustAnchor;
import java.security.cert.X509CertSelector;
import java.security.cert.X509Certificate;
import java.security.interfaces.ECPublicKey;
import java.security.spec.ECGenParameterSpec;
import java.security.spec.ECParameterSpec;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Date;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * Verify an attestation document against a pinned root, in the order of
 * {@code cape.verify.verifier} (each step its own exception):
 *
 * <ol>
 *   <li>Parse: COSE_Sign1, ES384, every payload rule ({@link FormatException}).
 *   <li>Signature: ECDSA P-384/SHA-384 over the Sig_structure with the leaf's key
 *       ({@link SignatureException}).
 *   <li>Chain: leaf, cabundle, the pinned root, valid at the check time (JDK PKIX, revocation
 *       off; {@link CertificateExpiredException} for the leaf's window, {@link ChainException}
 *       otherwise), and the leaf is no CA and may sign.
 *   <li>Time: no later than the check time plus skew ({@link DocumentTimestampException}), no
 *       older than the maximum age ({@link DocumentExpiredException}).
 *   <li>Debug mode: PCR0 zero is refused ({@link DebugEnclaveException}).
 *   <li>Nonce: byte equality ({@link NonceMismatchException}).
 *   <li>PCR allow-lists, by ascending index ({@link PcrMismatchException}).
 * </ol>
 */
public final class Verifier {
    private static final int MAX_CHAIN_DEPTH = 8;

    private Verifier() {}

    /** Verify raw COSE bytes as of {@code at}; returns the verified document. */
    public static AttestationDocument verify(
            byte[] data, X509Certificate root, Instant at, Policy policy) {
        AttestationDocument document = AttestationDocument.parse(data);
        X509Certificate leaf = certificate(document.certificate(), "document certificate");
        verifySignature(document, leaf);
        verifyChain(document, leaf, root, at);
        verifyTime(document, at, policy);
        verifyClaims(document, policy);
        return document;
    }

    /**
     * Verify a stored document at its own signed timestamp (key documents): the age limit is
     * meaningless there and not applied; every other check is.
     */
    public static AttestationDocument verifyArchived(
            byte[] data, X509Certificate root, Map<Integer, Set<ByteBuffer>> pcrs) {
        AttestationDocument parsed = AttestationDocument.parse(data);
        Policy policy = new Policy(null, pcrs, null, Policy.DEFAULT_CLOCK_SKEW, false);
        return verify(data, root, parsed.issuedAt(), policy);
    }

    /** A DER certificate, or a {@link FormatException} naming {@code what}. */
    public static X509Certificate certificate(byte[] der, String what) {
        try {
            return (X509Certificate) CertificateFactory.getInstance("X.509")
                    .generateCertificate(new ByteArrayInputStream(der));
        } catch (CertificateException | RuntimeException e) {
            throw new FormatException(what + " is not a valid DER X.509 certificate");
        }
    }

    private static void verifySignature(AttestationDocument document, X509Certificate leaf) {
        PublicKey key = leaf.getPublicKey();
        if (!(key instanceof ECPublicKey ec) || !isP384(ec.getParams())) {
            throw new SignatureException("document certificate does not hold a P-384 ECDSA key");
        }
        boolean valid;
        try {
            Signature verifier = Signature.getInstance("SHA384withECDSAinP1363Format");
            verifier.initVerify(key);
            verifier.update(document.toBeSigned());
            valid = verifier.verify(document.signature());
        } catch (GeneralSecurityException e) {
            valid = false;
        }
        if (!valid) {
            throw new SignatureException("COSE signature does not verify with the document certificate");
        }
    }

    private static boolean isP384(ECParameterSpec params) {
        try {
            AlgorithmParameters p384 = AlgorithmParameters.getInstance("EC");
            p384.init(new ECGenParameterSpec("secp384r1"));
            ECParameterSpec spec = p384.getParameterSpec(ECParameterSpec.class);
            return spec.getCurve().equals(params.getCurve())
                    && spec.getOrder().equals(params.getOrder())
                    && spec.getGenerator().equals(params.getGenerator());
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("the JDK lacks secp384r1", e);
        }
    }

    private static void verifyChain(
            AttestationDocument document, X509Certificate leaf, X509Certificate root, Instant at) {
        Date date = Date.from(at);
        Instant from = leaf.getNotBefore().toInstant();
        Instant to = leaf.getNotAfter().toInstant();
        if (at.isBefore(from) || at.isAfter(to)) {
            throw new CertificateExpiredException("document certificate is valid from " + from
                    + " to " + to + ", not at " + at);
        }
        List<X509Certificate> certificates = new ArrayList<>();
        certificates.add(leaf);
        List<byte[]> bundle = document.cabundle();
        for (int i = 0; i < bundle.size(); i++) {
            certificates.add(certificate(bundle.get(i), "cabundle[" + i + "]"));
        }
        try {
            root.checkValidity(date);
            X509CertSelector target = new X509CertSelector();
            target.setCertificate(leaf);
            PKIXBuilderParameters params =
                    new PKIXBuilderParameters(Set.of(new TrustAnchor(root, null)), target);
            params.addCertStore(CertStore.getInstance(
                    "Collection", new CollectionCertStoreParameters(certificates)));
            params.setDate(date);
            params.setRevocationEnabled(false);
            params.setMaxPathLength(MAX_CHAIN_DEPTH);
            CertPathBuilder.getInstance("PKIX").build(params);
        } catch (GeneralSecurityException e) {
            throw new ChainException("certificate chain does not lead to the pinned root at " + at
                    + ": " + e.getMessage());
        }
        // PKIX does not check an end entity's role; require what an attesting leaf must be.
        if (leaf.getExtensionValue("2.5.29.19") == null || leaf.getKeyUsage() == null) {
            throw new ChainException(
                    "document certificate lacks a required extension: basicConstraints and keyUsage");
        }
        if (leaf.getBasicConstraints() != -1) {
            throw new ChainException("document certificate is a CA certificate (basicConstraints CA=true)");
        }
        if (!leaf.getKeyUsage()[0]) {
            throw new ChainException("document certificate keyUsage lacks digitalSignature");
        }
    }

    private static void verifyTime(AttestationDocument document, Instant at, Policy policy) {
        Instant issued = document.issuedAt();
        if (issued.isAfter(at.plus(policy.clockSkew()))) {
            throw new DocumentTimestampException(
                    "document timestamp " + issued + " is after the check time " + at);
        }
        Duration maxAge = policy.maxAge();
        if (maxAge != null && Duration.between(issued, at).compareTo(maxAge) > 0) {
            throw new DocumentExpiredException("document was issued at " + issued + ", more than "
                    + maxAge.toSeconds() + " s before the check time " + at);
        }
    }

    private static void verifyClaims(AttestationDocument document, Policy policy) {
        if (document.isDebug() && !policy.allowDebug()) {
            throw new DebugEnclaveException("document comes from a debug-mode enclave (PCR0 is zero)");
        }
        byte[] nonce = policy.nonce();
        if (nonce != null) {
            byte[] got = document.nonce();
            if (got == null || !MessageDigest.isEqual(got, nonce)) {
                throw new NonceMismatchException("document does not carry the expected nonce");
            }
        }
        for (Map.Entry<Integer, Set<ByteBuffer>> pin : policy.pcrs().entrySet()) {
            byte[] actual = document.pcrs().get(pin.getKey());
            if (actual == null || !pin.getValue().contains(ByteBuffer.wrap(actual))) {
                List<byte[]> allowed = new ArrayList<>();
                for (ByteBuffer value : pin.getValue()) {
                    byte[] copy = new byte[value.remaining()];
                    value.duplicate().get(copy);
                    allowed.add(copy);
                }
                throw new PcrMismatchException(pin.getKey(), allowed, actual);
            }
        }
    }
}
