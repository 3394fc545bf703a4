package cape.verify;

import cape.errors.FormatException;
import java.io.ByteArrayInputStream;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.cert.CertificateEncodingException;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.util.HexFormat;

/** Attestation roots: load a PEM (or DER) certificate and name it by its SHA-256 fingerprint. */
public final class Roots {
    private Roots() {}

    /** One certificate from PEM or DER bytes. */
    public static X509Certificate load(byte[] data) {
        String text = new String(data, StandardCharsets.US_ASCII);
        if (text.contains("-----BEGIN") && !text.contains("-----BEGIN CERTIFICATE-----")) {
            throw new FormatException("the attestation root is not a PEM certificate");
        }
        try {
            Object cert = CertificateFactory.getInstance("X.509")
                    .generateCertificate(new ByteArrayInputStream(data));
            return (X509Certificate) cert;
        } catch (CertificateException | RuntimeException e) {
            throw new FormatException("the attestation root is not a valid X.509 certificate");
        }
    }

    /** Lower-case hex SHA-256 of the certificate's DER (what {@code cape login --trust-root} takes). */
    public static String fingerprint(X509Certificate certificate) {
        try {
            return HexFormat.of().formatHex(
                    MessageDigest.getInstance("SHA-256").digest(certificate.getEncoded()));
        } catch (NoSuchAlgorithmException | CertificateEncodingException e) {
            throw new IllegalStateException(e);
        }
    }
}
